#!/bin/sh
# chukei-bootstrap: makes a fresh hub usable, and is safe to run again.
# Registers the carriers, creates enterprises and services with chosen ids,
# and sets the rate card, all through `chukei-admin` (the relay's Admin API).
# New enterprises' API keys are printed once, as the relay returns them.
#
# Configured by environment (the compose file and the Kubernetes Job set it):
#   CHUKEI_RELAY_URL, CHUKEI_ADMIN_TOKEN   where the relay is, its admin token
#   CHUKEI_BOOTSTRAP_CARRIERS     carrier ids, space-separated: "aozora hikari"
#   CHUKEI_BOOTSTRAP_TOKEN_<ID>   each carrier's token (id upper-cased, '-' as '_')
#   CHUKEI_BOOTSTRAP_CARRIER_URL  the Deliver endpoint, %s is the id
#                                 (default http://carrier-%s:50061)
#   CHUKEI_BOOTSTRAP_ENTERPRISES  "id=service,service id …" (optional)
#   CHUKEI_BOOTSTRAP_RATE_CARD    rate-card entries, space-separated (optional)
#   CHUKEI_BOOTSTRAP_ZONE         the rate card's zone (default: the relay's)
set -eu

: "${CHUKEI_BOOTSTRAP_CARRIERS:?space-separated carrier ids}"
url_pattern="${CHUKEI_BOOTSTRAP_CARRIER_URL:-http://carrier-%s:50061}"
# Wait for the relay rather than fail while it starts.
export CHUKEI_ADMIN_CONNECT_WAIT_SECS="${CHUKEI_ADMIN_CONNECT_WAIT_SECS:-120}"

for id in $CHUKEI_BOOTSTRAP_CARRIERS; do
  case "$id" in
    *[!a-z0-9_-]*) echo "CHUKEI_BOOTSTRAP_CARRIERS: $id is not a carrier id" >&2; exit 2 ;;
  esac
  var="CHUKEI_BOOTSTRAP_TOKEN_$(printf %s "$id" | tr 'a-z-' 'A-Z_')"
  eval "token=\${$var:?$var is not set}"
  # shellcheck disable=SC2059 # the pattern is the operator's format string
  endpoint="$(printf "$url_pattern" "$id")"
  CHUKEI_CARRIER_TOKEN="$token" chukei-admin register-carrier --id "$id" --endpoint "$endpoint"
done

for entry in ${CHUKEI_BOOTSTRAP_ENTERPRISES:-}; do
  enterprise="${entry%%=*}"
  chukei-admin create-enterprise --id "$enterprise" --name "$enterprise" --exists-ok
  if [ "$entry" != "$enterprise" ]; then
    for service in $(printf %s "${entry#*=}" | tr ',' ' '); do
      chukei-admin create-service --enterprise "$enterprise" --id "$enterprise-$service" \
        --name "$service" --exists-ok
    done
  fi
done

if [ -n "${CHUKEI_BOOTSTRAP_RATE_CARD:-}" ]; then
  set --
  for entry in $CHUKEI_BOOTSTRAP_RATE_CARD; do set -- "$@" --entry "$entry"; done
  if [ -n "${CHUKEI_BOOTSTRAP_ZONE:-}" ]; then set -- "$@" --zone "$CHUKEI_BOOTSTRAP_ZONE"; fi
  chukei-admin rate-card "$@"
fi
echo "bootstrap done"
