#!/bin/sh
# Entrypoint of the genrec images.
#
# No arguments: serve the bundle at $GENREC_BUNDLE (`genrec serve`). When
# GENREC_PUBLISH_ON_START=1 (the all-in-one `cpu` image's default) the bundle's user
# embeddings and histories are published to Redis first ($REDIS_URL, else the embedded
# Redis on $GENREC_REDIS_DB), so a fresh container answers with personalised results.
# Leave it 0 wherever several replicas share one Redis: publish once, from a job.
#
# Arguments: any genrec command, e.g. `publish-embeddings /bundle` or `engine-server /bundle`.
set -eu

if [ "$#" -gt 0 ]; then
    exec genrec "$@"
fi

if [ "${GENREC_PUBLISH_ON_START:-0}" = "1" ]; then
    genrec publish-embeddings "${GENREC_BUNDLE}" \
        --redis-db "${GENREC_REDIS_DB}" --history-len "${GENREC_HISTORY_LEN:-1000}"
fi
exec genrec serve
