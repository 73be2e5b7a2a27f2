#!/bin/sh
# One-shot, in temporalio/admin-tools, once the server is healthy: the namespace and the workflow's
# custom search attributes. A second run finds them there and exits 0.
set -eu
: "${TEMPORAL_ADDRESS:?}"
namespace=${TEMPORAL_NAMESPACE:-default}
attrs="InstanceId HypervisorHost ImageId RebuildPhase"

i=0
until temporal operator cluster health --address "$TEMPORAL_ADDRESS" >/dev/null 2>&1; do
  i=$((i + 1)); [ "$i" -lt 90 ] || { echo "Temporal at $TEMPORAL_ADDRESS is not healthy" >&2; exit 1; }
  sleep 2
done

temporal operator namespace describe -n "$namespace" --address "$TEMPORAL_ADDRESS" >/dev/null 2>&1 ||
  temporal operator namespace create -n "$namespace" --retention 30d --address "$TEMPORAL_ADDRESS"

all_present() {
  list=$(temporal operator search-attribute list -n "$namespace" --address "$TEMPORAL_ADDRESS") || return 1
  for a in $attrs; do echo "$list" | grep -qw "$a" || return 1; done
}
i=0
until all_present || temporal operator search-attribute create -n "$namespace" --address "$TEMPORAL_ADDRESS" \
    --name InstanceId --type Keyword \
    --name HypervisorHost --type Keyword \
    --name ImageId --type Keyword \
    --name RebuildPhase --type Keyword; do
  i=$((i + 1)); [ "$i" -lt 30 ] || { echo "search attributes could not be registered" >&2; exit 1; }
  sleep 2
done
echo "namespace $namespace and search attributes ready: $attrs"
