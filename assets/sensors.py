"""The landing-zone sensor: new shards become partitions and runs of ``shard_ingest_job``.

Each tick scans ``landing/<dataset>/<stem>.tar`` (:func:`curation.shards.find_shards`) and
compares every file's ``(size, mtime_ns)`` with the cursor (a JSON map ``{shard_key:
"size:mtime_ns"}``). A shard key the instance does not know yet is added to the ``shards``
dynamic partitions; every new or changed file gets a run request whose ``run_key`` is
``"<shard_key>:<size>:<mtime_ns>"``, so the same file state is never ingested twice and a
replaced file is. A shard whose ``samples`` partition is already materialized when the sensor
first meets it (e.g. by ``curation demo``) is recorded without a run. Ticks that find nothing
say why (``SkipReason``).
"""


import json

import dagster as dg

from assets.jobs import shard_ingest_job
from assets.partitions import SHARDS, shard_partitions
from curation.shards import find_shards
from assets.settings import automation_status
from resources import DatasetsResource


def _file_state(path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


@dg.sensor(
    job=shard_ingest_job,
    minimum_interval_seconds=30,
    default_status=automation_status(),
    description="Watches the landing zone; adds a `shards` partition per new shard and "
    "requests one shard_ingest_job run per new or changed shard file.",
)
def landing_sensor(context: dg.SensorEvaluationContext, datasets: DatasetsResource):
    known: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    shards = find_shards(datasets.landing)
    if not shards:
        return dg.SkipReason(f"no shards in the landing zone {datasets.landing} (expected <dataset>/<stem>.tar)")

    registered = set(context.instance.get_dynamic_partitions(SHARDS))
    materialized = context.instance.get_materialized_partitions(dg.AssetKey("samples")) if registered else set()
    new_keys: list[str] = []
    requests: list[dg.RunRequest] = []
    already_ingested: list[str] = []
    cursor = dict(known)
    for key, path in shards.items():
        try:
            state = _file_state(path)
        except FileNotFoundError:  # removed between the scan and the stat
            continue
        if known.get(key) == state:
            continue
        cursor[key] = state
        if key not in registered:
            new_keys.append(key)
        elif key not in known and key in materialized:
            already_ingested.append(key)
            continue
        requests.append(
            dg.RunRequest(
                run_key=f"{key}:{state}",
                partition_key=key,
                tags={"curation/shard": key, "curation/trigger": "landing_sensor"},
            )
        )
    gone = sorted(set(known) - set(shards))
    for key in gone:
        cursor.pop(key, None)
    if gone:
        context.log.info("shards no longer in the landing zone (partitions kept): %s", gone)
    if already_ingested:
        context.log.info("%d shards were already ingested before the sensor saw them", len(already_ingested))
    new_cursor = json.dumps(cursor, sort_keys=True, separators=(",", ":"))
    if not requests:
        return dg.SensorResult(
            skip_reason=dg.SkipReason(
                f"no new or changed shards among {len(shards)} in {datasets.landing}"
                + (f" ({len(already_ingested)} already ingested)" if already_ingested else "")
            ),
            cursor=new_cursor,
        )
    context.log.info("requesting %d runs (%d new partitions)", len(requests), len(new_keys))
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[shard_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=new_cursor,
    )


SENSORS = [landing_sensor]
