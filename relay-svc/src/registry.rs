//! The three registries' domain types: registrations (D1: user × enterprise
//! [× service]), contracts (D2: user × carrier, one primary) and consented
//! profiles (D3: only what the user chose to share, at the chosen granularity).
//!
//! Storage of these lives in `storage::registry`; conversion from the wire in
//! `grpc::ingress`. Nothing here may ever be logged with its values.

/// A person's gender as shared with an enterprise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gender {
    Female,
    Male,
    Other,
}

impl Gender {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Female => "female",
            Self::Male => "male",
            Self::Other => "other",
        }
    }
}

/// User × carrier, as a carrier reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contract {
    pub user_id: String,
    pub primary: bool,
    /// False ends the contract.
    pub active: bool,
}

/// The attributes one user consented to share with one enterprise. `None`
/// means not shared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub gender: Option<Gender>,
    /// Inclusive age range: equal bounds for an exact age, a decade for "30s".
    pub age: Option<(u32, u32)>,
    /// Region path as coarse as chosen: "tokyo" or "tokyo/shibuya".
    pub region: Option<String>,
    pub occupation: Option<String>,
}

impl Profile {
    /// Nothing shared: the person declined or withdrew.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Which fields are shared, without their values: what the consent record keeps.
    pub fn shared_fields(&self) -> String {
        let mut fields = Vec::new();
        if self.gender.is_some() {
            fields.push("gender");
        }
        match self.age {
            Some((min, max)) if min == max => fields.push("age:exact"),
            Some(_) => fields.push("age:range"),
            None => {}
        }
        match &self.region {
            Some(region) if region.contains('/') => fields.push("region:city"),
            Some(_) => fields.push("region:prefecture"),
            None => {}
        }
        if self.occupation.is_some() {
            fields.push("occupation");
        }
        if fields.is_empty() {
            return "none".to_owned();
        }
        fields.join(",")
    }
}

/// A user registering with an enterprise (and optionally one of its services).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRegistration {
    pub user_id: String,
    pub enterprise_id: String,
    pub service_id: Option<String>,
    pub profile: Profile,
    /// The version of the consent text the person was shown.
    pub text_version: String,
}

/// A person changing or withdrawing (an empty profile) what they share
/// with one enterprise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsentChange {
    pub user_id: String,
    pub enterprise_id: String,
    pub profile: Profile,
    pub text_version: String,
}

/// A user leaving one of an enterprise's services, the enterprise (erased
/// from it), or the hub (`enterprise_id` `None`: erased everywhere).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unregistration {
    pub user_id: String,
    pub enterprise_id: Option<String>,
    pub service_id: Option<String>,
}
