"""Model lifecycle: upstream's model list read from a real simulator, kept in a real Redis, merged
with the catalog. Dates are fixed (a clock of the test's own, far-past shutdowns), so nothing here
depends on today's date.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from service.catalog import load_catalog
from service.models import lifecycle
from service.models.lifecycle import SHUT_DOWN, SHUTTING_DOWN, ModelView, UpstreamList
from service.settings import Settings
from service.upstream import Upstream
from service.upstream.port import make_client
from tests.support.catalog import catalog_variant
from tests.support.simulator import SimulatorHandle, start_simulator

TODAY = dt.date(2026, 6, 1)  # a clock of the tests' own: before the catalog's 2026-12-01 dates
FAR_PAST = "2020-01-01"


def upstream_for(url: str) -> Upstream:
    settings = Settings(openai_base_url=url, openai_api_key="sk-test", openai_max_retries=0)
    return Upstream(make_client(settings))


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    # Upstream announces a shutdown the catalog does not have (far in the past), and no longer
    # offers gpt-image-2.6-flare (its catalog lacks it).
    tmp = tmp_path_factory.mktemp("sim")
    catalog = catalog_variant(tmp, "upstream.toml", drop=("gpt-image-2.6-flare",))
    handle = start_simulator(
        tmp / "data",
        catalog_file=catalog,
        shutdown=f"gpt-image-2-2026-04-21={FAR_PAST}",
        validate_seconds=0,
    )
    yield handle
    handle.stop()


def test_refresh_keeps_upstreams_list_and_the_view_refuses_what_it_says(
    sim: SimulatorHandle, redis_client: redis.Redis
) -> None:
    catalog = load_catalog()
    listed = lifecycle.refresh(redis_client, upstream_for(sim.url))
    assert listed is not None and listed.models["gpt-image-2-2026-04-21"] == dt.date(2020, 1, 1)
    view = lifecycle.load_view(redis_client, catalog, TODAY)
    assert view.source == "upstream"

    snapshot = view.get("gpt-image-2-2026-04-21")
    assert snapshot is not None and snapshot.state == SHUT_DOWN
    assert snapshot.shutdown_source == "upstream"
    refusal = snapshot.refusal() or ""
    assert FAR_PAST in refusal and "announced by upstream" in refusal

    flare = view.get("gpt-image-2.6-flare")
    assert flare is not None and flare.offered is False
    assert "not offered by upstream" in (flare.refusal() or "")

    alias = view.get("gpt-image-2")
    assert alias is not None and alias.refusal() is None and alias.offered is True
    # The catalog's own dates still count, against the view's clock.
    old = view.get("gpt-image-1.5")
    assert old is not None and old.state == SHUTTING_DOWN and old.refusal() is None
    later = lifecycle.load_view(redis_client, catalog, dt.date(2026, 12, 1))
    assert "gpt-image-2.6-sunburst" in (later.get("gpt-image-1.5").refusal() or "")  # type: ignore[union-attr]


def test_an_unreachable_upstream_keeps_the_last_list_or_leaves_the_catalog_alone(
    sim: SimulatorHandle, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = load_catalog()
    dead = upstream_for("http://127.0.0.1:9/v1")
    # Nothing known yet: the catalog alone, and a warning.
    assert lifecycle.refresh(redis_client, dead, timeout=2, max_retries=0) is None
    assert "catalog alone" in caplog.text
    alone = lifecycle.load_view(redis_client, catalog, TODAY)
    assert alone.source == "catalog" and all(
        s.refusal() is None for s in alone if s.model.id.startswith("gpt-image-2")
    )
    # Once read, a failed refresh keeps the last list in force.
    assert lifecycle.refresh(redis_client, upstream_for(sim.url)) is not None
    assert lifecycle.refresh(redis_client, dead, timeout=2, max_retries=0) is None
    kept = lifecycle.load_view(redis_client, catalog, TODAY)
    assert kept.get("gpt-image-2-2026-04-21").state == SHUT_DOWN  # type: ignore[union-attr]


def view_of(listed: dict[str, str | None], today: dt.date = TODAY, **kw: Any) -> ModelView:
    upstream = UpstreamList(
        time.time(), {m: dt.date.fromisoformat(d) if d else None for m, d in listed.items()}
    )
    return ModelView(load_catalog(), upstream, kw.get("refusals", {}), today)


def test_the_earlier_date_wins_and_a_coming_shutdown_warns() -> None:
    everything: dict[str, str | None] = {m: None for m in load_catalog().models}
    # Upstream postpones gpt-image-1.5 (the catalog's date stands) and brings gpt-image-2
    # forward (upstream's stands).
    view = view_of({**everything, "gpt-image-1.5": "2027-06-01", "gpt-image-2": "2026-09-01"})
    old = view.get("gpt-image-1.5")
    assert old is not None and old.shutdown_date == dt.date(2026, 12, 1)
    assert old.shutdown_source == "catalog"
    new = view.get("gpt-image-2")
    assert new is not None and new.state == SHUTTING_DOWN and new.shutdown_source == "upstream"
    assert "2026-09-01" in (new.warning() or "")
    assert (
        dict(view.shutdown_timestamps())["gpt-image-2"]
        == dt.datetime(2026, 9, 1, tzinfo=dt.UTC).timestamp()
    )


def test_a_list_naming_none_of_our_models_is_not_read_as_everything_withdrawn() -> None:
    view = view_of({"gpt-4o": None, "whisper-1": None})
    assert view.source == "catalog"
    assert all(s.offered is None for s in view)
    assert view.get("gpt-image-2").refusal() is None  # type: ignore[union-attr]


def test_catalog_variant_helper_drops_and_sets_batch(tmp_path: Path) -> None:
    path = catalog_variant(
        tmp_path, "c.toml", drop=("gpt-image-1",), batch={"gpt-image-2.6-sunburst": True}
    )
    catalog = load_catalog(path)
    assert "gpt-image-1" not in catalog.models
    assert catalog.models["gpt-image-2.6-sunburst"].batch is True
    assert catalog.models["gpt-image-2.6-flare"].batch is False
