"""Dagster asset definitions, checks, sensors, schedules and jobs (thin adapters over ``curation``)."""
