"""The re-curation schedule, the ingest -> pool -> recipes -> report chain, and recipe backfills.

The chain is exercised on stand-in assets that carry the real asset keys, partitions and
dependencies but compute nothing heavy (each records what it was asked to do), so every
request the sensors make is executed in process on a real (temporary) instance.
"""


from datetime import datetime, timezone

import pytest
from dagster import (
    RunRequest,
    AssetExecutionContext,
    AssetKey,
    Config,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    RunsFilter,
    SkipReason,
    asset,
    build_run_status_sensor_context,
    build_schedule_context,
    build_sensor_context,
    define_asset_job,
)
from dagster._core.execution.backfill import BulkActionStatus

from assets import backfill, jobs, schedules, sensors, stages
from assets.partitions import recipe_partitions
from resources import LakeResource

RECIPES = recipe_partitions.get_partition_keys()
CALLS: list[tuple[str, str | None, str | None]] = []  # (asset, partition, mode)


# ---- stand-in lineage with the real keys ------------------------------------------------


@asset(name="samples")
def _samples():
    CALLS.append(("samples", None, None))
    return 1


class _ClusterConfig(Config):
    mode: str = "auto"


@asset(name="concept_clusters", deps=["samples"])
def _concept_clusters(config: _ClusterConfig):
    CALLS.append(("concept_clusters", None, config.mode))
    return config.mode


@asset(name="dedup_scores", deps=["concept_clusters"])
def _dedup_scores():
    CALLS.append(("dedup_scores", None, None))


@asset(name="complexity_scores", deps=["concept_clusters"])
def _complexity_scores():
    CALLS.append(("complexity_scores", None, None))


@asset(name="filter_model", deps=["samples"])
def _filter_model():
    CALLS.append(("filter_model", None, None))


def _recipe_asset(name, deps):
    @asset(name=name, deps=deps, partitions_def=recipe_partitions)
    def _a(context: AssetExecutionContext):
        CALLS.append((name, context.partition_key, None))

    return _a


_pruned = _recipe_asset("pruned_subsets", ["concept_clusters", "dedup_scores", "complexity_scores", "filter_model"])
_trained = _recipe_asset("trained_checkpoints", ["pruned_subsets"])
_evals = _recipe_asset("eval_reports", ["trained_checkpoints"])


@asset(name="curation_report", deps=["eval_reports"])
def _report():
    CALLS.append(("curation_report", None, None))


shard_ingest_job = define_asset_job(sensors.INGEST_JOB, selection=["samples"])

DEFS = Definitions(
    assets=[_samples, _concept_clusters, _dedup_scores, _complexity_scores, _filter_model, _pruned, _trained, _evals, _report],
    jobs=[shard_ingest_job, *jobs.CURATION_JOBS],
    schedules=schedules.SCHEDULES,
    sensors=sensors.AUTOMATION_SENSORS,
    resources={"lake": LakeResource()},  # the maintenance schedule's job needs it (never run here)
)


@pytest.fixture
def instance(tmp_path):
    CALLS.clear()
    with DagsterInstance.ephemeral(tempdir=str(tmp_path)) as inst:
        yield inst


def _execute(instance, req):
    """Execute a RunRequest in process the way the daemon would launch it."""
    job = DEFS.resolve_job_def(req.job_name)
    result = job.execute_in_process(
        instance=instance,
        run_config=req.run_config or None,
        partition_key=req.partition_key,
        tags=dict(req.tags),
    )
    assert result.success
    return result


def _run_status_context(instance, sensor, result):
    run = instance.get_run_by_id(result.run_id)
    event = next(e for e in result.all_events if e.event_type_value == "PIPELINE_SUCCESS")
    return build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_instance=instance, dagster_run=run, dagster_event=event
    )


# ---- tests ------------------------------------------------------------------------------


def test_definitions_resolve_jobs_schedule_sensors():
    assert {j.name for j in jobs.CURATION_JOBS} == {"pool_curation_job", "recipe_job", "report_job"}
    pool = DEFS.resolve_job_def("pool_curation_job")
    assert {k.to_user_string() for k in pool.asset_layer.executable_asset_keys} == set(stages.POOL_ASSETS)
    recipes = DEFS.resolve_job_def("recipe_job")
    assert recipes.partitions_def == recipe_partitions
    assert pool.tags[stages.STAGE_TAG] == "pool"
    assert {s.name for s in sensors.AUTOMATION_SENSORS} == {"curate_after_ingest", "recipes_after_pool_curation", "report_after_recipes"}
    assert DEFS.resolve_schedule_def("recurate_schedule").cron_schedule == schedules.DEFAULT_RECURATE_CRON


def test_schedule_requests_retrain_with_deterministic_run_key():
    t = datetime(2025, 1, 5, 3, 0, tzinfo=timezone.utc)
    req = schedules.recurate_schedule(build_schedule_context(scheduled_execution_time=t))
    again = schedules.recurate_schedule(build_schedule_context(scheduled_execution_time=t))
    assert req.run_key == again.run_key == "recurate:2025-01-05T03:00:00Z"
    assert req.job_name == "pool_curation_job"
    assert req.run_config == {"ops": {"concept_clusters": {"config": {"mode": "retrain"}}}}
    assert req.tags[stages.WAVE_TAG] == req.run_key and req.tags[stages.TRIGGER_TAG] == "schedule"
    later = schedules.recurate_schedule(build_schedule_context(scheduled_execution_time=datetime(2025, 1, 12, 3, tzinfo=timezone.utc)))
    assert later.run_key != req.run_key


def test_schedule_cron_comes_from_config(monkeypatch):
    monkeypatch.setenv("CURATION_RECURATE_CRON", "0 4 * * *")
    assert schedules.recurate_cron() == "0 4 * * *"
    with pytest.raises(ValueError, match="mode: got 'sometimes'"):
        stages.pool_run_config("sometimes")
    with pytest.raises(ValueError, match="unknown recipes"):
        jobs.recipe_run_requests("w", ["nope"])


def test_ingest_success_drives_the_whole_chain(instance):
    sensor_ctx = build_sensor_context(instance=instance, definitions=DEFS)
    skip = sensors.curate_after_ingest(sensor_ctx)
    assert isinstance(skip, SkipReason) and "no shard_ingest_job run succeeded" in skip.skip_message

    # a dataset drop: two shard ingest runs succeed
    ingest = [DEFS.resolve_job_def(sensors.INGEST_JOB).execute_in_process(instance=instance) for _ in range(2)]
    # ... while a third is still running: wait for it
    queued = instance.create_run_for_job(DEFS.resolve_job_def(sensors.INGEST_JOB), status=DagsterRunStatus.STARTED)
    skip = sensors.curate_after_ingest(build_sensor_context(instance=instance, definitions=DEFS))
    assert isinstance(skip, SkipReason) and "still queued or running" in skip.skip_message
    instance.report_run_canceled(queued)

    ctx = build_sensor_context(instance=instance, definitions=DEFS)
    req = sensors.curate_after_ingest(ctx)
    assert req.job_name == "pool_curation_job"
    assert req.run_config["ops"]["concept_clusters"]["config"]["mode"] == "auto"
    assert req.run_key == f"ingest:{ingest[-1].run_id}"
    # the cursor advanced: the same successes do not trigger twice
    again = sensors.curate_after_ingest(build_sensor_context(instance=instance, cursor=ctx.cursor, definitions=DEFS))
    assert isinstance(again, SkipReason)

    pool_result = _execute(instance, req)
    assert ("concept_clusters", None, "auto") in CALLS

    # pool curation succeeded -> one recipe run per recipe, same wave
    reqs = sensors.recipes_after_pool_curation(_run_status_context(instance, sensors.recipes_after_pool_curation, pool_result))
    assert sorted(r.partition_key for r in reqs) == sorted(RECIPES)
    assert {r.tags[stages.WAVE_TAG] for r in reqs} == {req.run_key}
    assert len({r.run_key for r in reqs}) == len(RECIPES)

    # the report waits for every recipe of the wave
    results = []
    for i, r in enumerate(reqs):
        results.append(_execute(instance, r))
        out = sensors.report_after_recipes(_run_status_context(instance, sensors.report_after_recipes, results[-1]))
        if i < len(reqs) - 1:
            assert isinstance(out, SkipReason) and "waiting for" in out.skip_message
    assert out.run_key == f"{req.run_key}:report" and out.job_name in (None, "report_job")
    _execute(instance, RunRequest(run_key=out.run_key, job_name="report_job", tags=out.tags))

    done = [c for c in CALLS if c[0] == "eval_reports"]
    assert sorted(p for _, p, _ in done) == sorted(RECIPES)
    assert CALLS[-1][0] == "curation_report"


def test_schedule_request_runs_retrain(instance):
    req = schedules.recurate_schedule(build_schedule_context(scheduled_execution_time=datetime(2025, 1, 5, 3, tzinfo=timezone.utc)))
    _execute(instance, req)
    assert ("concept_clusters", None, "retrain") in CALLS


def test_backfill_recipes_targets_every_recipe_and_the_report(instance):
    backfill_id = backfill.backfill_recipes(instance, defs=DEFS)
    bf = instance.get_backfill(backfill_id)
    assert bf.status == BulkActionStatus.REQUESTED
    assert bf.tags[stages.TRIGGER_TAG] == "backfill"
    target = bf.asset_backfill_data.target_subset
    for key in stages.RECIPE_ASSETS:
        subset = target.get_partitions_subset(AssetKey(key))
        assert sorted(subset.get_partition_keys()) == sorted(RECIPES)
    assert AssetKey("curation_report") in target.non_partitioned_asset_keys
    assert AssetKey("concept_clusters") not in target.asset_keys

    two = backfill.backfill_recipes(instance, recipes=["full", RECIPES[1]], defs=DEFS, include_report=False)
    target = instance.get_backfill(two).asset_backfill_data.target_subset
    assert sorted(target.get_partitions_subset(AssetKey("pruned_subsets")).get_partition_keys()) == sorted(["full", RECIPES[1]])
    assert AssetKey("curation_report") not in target.asset_keys
    with pytest.raises(ValueError, match="unknown recipes"):
        backfill.backfill_recipes(instance, recipes=["bogus"], defs=DEFS)


def test_ui_backfill_of_recipe_job_triggers_report_when_complete(instance):
    """A job backfill launched from the UI tags its runs with dagster/backfill: the report
    sensor treats the backfill as a wave and fires once all its recipes have succeeded."""
    from dagster._core.execution.backfill import PartitionBackfill

    chosen = RECIPES[:2]
    bf = PartitionBackfill(
        backfill_id="uibf",
        status=BulkActionStatus.COMPLETED,
        from_failure=False,
        tags={},
        backfill_timestamp=0.0,
        partition_names=chosen,
    )
    instance.add_backfill(bf)
    out = None
    for r in chosen:
        res = _execute(
            instance,
            RunRequest(job_name="recipe_job", partition_key=r, tags={stages.BACKFILL_TAG: "uibf"}),
        )
        out = sensors.report_after_recipes(_run_status_context(instance, sensors.report_after_recipes, res))
        if r != chosen[-1]:
            assert isinstance(out, SkipReason)
    assert out.run_key == "backfill:uibf:report"
    runs = instance.get_runs(filters=RunsFilter(job_name="recipe_job", tags={stages.BACKFILL_TAG: "uibf"}))
    assert len(runs) == 2


def test_run_configs_validate_against_the_real_definitions():
    """The jobs resolve over the platform's real assets and the run config the sensor and
    the schedule send is valid for the real concept_clusters config."""
    from dagster import validate_run_config

    from assets.definitions import defs

    merged = Definitions(
        assets=list(defs.assets or []),
        asset_checks=list(defs.asset_checks or []),
        jobs=jobs.CURATION_JOBS,
        schedules=schedules.SCHEDULES,
        sensors=sensors.AUTOMATION_SENSORS,
        resources=defs.resources,
    )
    pool = merged.resolve_job_def("pool_curation_job")
    for mode in ("auto", "retrain"):
        validate_run_config(pool, stages.pool_run_config(mode))
    assert merged.resolve_job_def("recipe_job").partitions_def == recipe_partitions
    assert {k.to_user_string() for k in merged.resolve_job_def("report_job").asset_layer.executable_asset_keys} == {"curation_report"}


def test_backfill_title_stays_within_dagsters_limit():
    from assets.backfill import MAX_TITLE, backfill_title

    assert backfill_title(["full", "dbp@0.5"]) == "recipes: full, dbp@0.5"
    many = [f"recipe-with-a-long-name@{i}" for i in range(12)]
    title = backfill_title(many)
    assert len(title) <= MAX_TITLE and title.endswith("(12 recipes)") and title.startswith("recipes: recipe-with")
    assert backfill_title(["x" * 200]) == "1 recipes"
