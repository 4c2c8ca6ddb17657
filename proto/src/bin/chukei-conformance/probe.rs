//! The cases every server shares: `grpc.health.v1` says SERVING for each
//! service the port serves, and reflection lists exactly those services.

use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::{v1 as reflection, v1alpha};

use crate::Report;

/// Health for the whole server and for each of `services`.
pub(crate) async fn health(channel: &Channel, services: &[&str]) -> Result<String, String> {
    let mut client = HealthClient::new(channel.clone());
    for service in std::iter::once(&"").chain(services) {
        let status = client
            .check(HealthCheckRequest {
                service: (*service).to_owned(),
            })
            .await
            .map_err(|status| format!("Check({service:?}) answered {status}"))?
            .into_inner()
            .status();
        if status != ServingStatus::Serving {
            return Err(format!(
                "Check({service:?}) answered {status:?}, not SERVING"
            ));
        }
    }
    Ok(format!(
        "SERVING for the server and {}",
        services.join(", ")
    ))
}

/// What reflection lists: over `grpc.reflection.v1`, or over the older
/// `v1alpha` when the server has only that (as grpcurl falls back).
async fn listed(channel: &Channel) -> Result<Vec<String>, String> {
    let mut client =
        reflection::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = reflection::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            reflection::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await;
    let mut answers = match answers {
        Ok(answers) => answers.into_inner(),
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            return listed_v1alpha(channel).await;
        }
        Err(status) => return Err(format!("ServerReflectionInfo answered {status}")),
    };
    let answer = answers
        .message()
        .await
        .map_err(|status| format!("ServerReflectionInfo answered {status}"))?
        .ok_or("ServerReflectionInfo ended without an answer")?;
    match answer.message_response {
        Some(reflection::server_reflection_response::MessageResponse::ListServicesResponse(
            list,
        )) => Ok(list.service.into_iter().map(|s| s.name).collect()),
        other => Err(format!("ListServices answered {other:?}")),
    }
}

async fn listed_v1alpha(channel: &Channel) -> Result<Vec<String>, String> {
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let answer = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .map_err(|status| format!("v1alpha ServerReflectionInfo answered {status}"))?
        .into_inner()
        .message()
        .await
        .map_err(|status| format!("v1alpha ServerReflectionInfo answered {status}"))?
        .ok_or("v1alpha ServerReflectionInfo ended without an answer")?;
    match answer.message_response {
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => Err(format!("v1alpha ListServices answered {other:?}")),
    }
}

/// Reflection lists each of `services` and no other `chukei.*` service.
pub(crate) async fn reflection(channel: &Channel, services: &[&str]) -> Result<String, String> {
    let listed = listed(channel).await?;
    let missing: Vec<&&str> = services
        .iter()
        .filter(|s| !listed.iter().any(|l| l == *s))
        .collect();
    let extra: Vec<&String> = listed
        .iter()
        .filter(|l| l.starts_with("chukei.") && !services.contains(&l.as_str()))
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(format!(
            "lists {listed:?}: missing {missing:?}, not served here {extra:?}"
        ));
    }
    Ok(format!("lists {}", services.join(", ")))
}

/// Both probes of one port, as two cases.
pub(crate) async fn port(
    report: &mut Report,
    channel: &Channel,
    services: &[&str],
    health_case: &'static str,
    reflection_case: &'static str,
) {
    report.case(health_case, health(channel, services).await);
    report.case(reflection_case, reflection(channel, services).await);
}
