"""Upstream news played by the simulator: ``--shutdown`` dates and ``--batch-unsupported`` models.

Real simulator processes, driven with the official SDK. Dates are far in the past or future, so
nothing here depends on today's date.
"""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest

from service.catalog import DEFAULT_CATALOG_FILE
from simulator.cli import parse_config
from tests.simulator.conftest import gen_line, submit, wait_status
from tests.support.procs import free_port

PAST, FUTURE = "2000-01-02", "2999-12-31"


def test_shutdown_flags_replace_what_models_announce_and_refuse_after_the_date(make_sim):
    sim = make_sim(
        shutdown=(
            f"gpt-image-2-2026-04-21={PAST},gpt-image-2={FUTURE},"
            f"gpt-image-1={FUTURE},gpt-image-1.5={PAST}"
        )
    )
    client = sim.client(max_retries=0)
    announced = {m.id: m.shutdown_date for m in client.models.list()}
    # A date the catalog does not have, one replacing the catalog's, and the untouched rest.
    assert announced["gpt-image-2-2026-04-21"] == PAST
    assert announced["gpt-image-2"] == FUTURE
    assert announced["gpt-image-1"] == FUTURE
    assert announced["gpt-image-1.5"] == PAST
    assert announced["gpt-image-1-mini"] == "2026-12-01"
    assert announced["gpt-image-2.6-flare"] is None
    assert client.models.retrieve("gpt-image-2-2026-04-21").shutdown_date == PAST

    # Past the announced date: refused, sync and batch, naming the date.
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="gpt-image-2-2026-04-21", prompt="a mug", quality="low")
    assert info.value.code == "model_not_found" and PAST in info.value.message
    failed = wait_status(client, submit(client, [gen_line("a", model="gpt-image-2-2026-04-21")]).id)
    assert failed.status == "failed" and failed.errors and failed.errors.data
    assert failed.errors.data[0].code == "model_not_found"
    assert PAST in (failed.errors.data[0].message or "")
    # The refusal names the catalog's replacements: the 2.6 models.
    with pytest.raises(openai.NotFoundError) as old:
        client.images.generate(model="gpt-image-1.5", prompt="a mug", quality="low")
    assert "'gpt-image-2.6-sunburst' or 'gpt-image-2.6-flare'" in old.value.message

    # Before it: served, even a model the catalog has shut down.
    assert client.images.generate(model="gpt-image-2", prompt="a mug", quality="low").data
    assert client.images.generate(model="gpt-image-1", prompt="a mug", quality="low").data
    assert wait_status(client, submit(client, [gen_line("b")]).id).status == "completed"


def test_the_shutdown_flag_repeats_and_has_a_comma_separated_env_twin(monkeypatch):
    config = parse_config(
        ["--shutdown", f"gpt-image-2={FUTURE}", "--shutdown", f"a={PAST}, b={FUTURE}"]
    )
    assert {m: d.isoformat() for m, d in config.shutdown.items()} == {
        "gpt-image-2": FUTURE,
        "a": PAST,
        "b": FUTURE,
    }
    monkeypatch.setenv("IMAGEBATCH_SIM_SHUTDOWN", f"x={PAST},y={FUTURE}")
    monkeypatch.setenv("IMAGEBATCH_SIM_BATCH_UNSUPPORTED", "m1, m2")
    from_env = parse_config([])
    assert {m: d.isoformat() for m, d in from_env.shutdown.items()} == {"x": PAST, "y": FUTURE}
    assert from_env.batch_unsupported == {"m1", "m2"}
    # A flag on the command line wins over the environment.
    assert parse_config(["--batch-unsupported", "m3"]).batch_unsupported == {"m3"}


@pytest.mark.parametrize(
    ("argv", "flag", "fragment"),
    [
        (["--shutdown", "gpt-image-2"], "--shutdown", "'gpt-image-2' is not MODEL=YYYY-MM-DD"),
        (["--shutdown", "gpt-image-2=tomorrow"], "--shutdown", "is not MODEL=YYYY-MM-DD"),
    ],
)
def test_bad_shutdown_values_exit_naming_the_flag(capsys, argv, flag, fragment):
    with pytest.raises(SystemExit):
        parse_config(argv)
    err = capsys.readouterr().err
    assert flag in err and fragment in err


@pytest.mark.parametrize("flag", ["--shutdown", "--batch-unsupported"])
def test_a_flag_naming_a_model_the_catalog_lacks_stops_the_simulator(tmp_path, flag):
    value = "gpt-image-42=2000-01-01" if flag == "--shutdown" else "gpt-image-42"
    args = ["--data-dir", str(tmp_path), "--port", str(free_port()), flag, value]
    done = subprocess.run(
        [sys.executable, "-m", "simulator", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert flag in done.stderr and "'gpt-image-42'" in done.stderr


def test_batch_unsupported_fails_batches_at_validation_and_adds_to_the_catalog(
    make_sim, tmp_path, monkeypatch
):
    # The operator's catalog claims batch support for both 2.6 models; upstream refuses one. Both
    # settings come from the environment, as `imagebatch up` passes them.
    catalog = tmp_path / "catalog.toml"
    text = DEFAULT_CATALOG_FILE.read_text()
    for model in ("gpt-image-2.6-sunburst", "gpt-image-2.6-flare"):
        head = f'[models."{model}"]\ncreated = 1793750400\nowned_by = "system"\n'
        assert head + "batch = false" in text
        text = text.replace(head + "batch = false", head + "batch = true")
    catalog.write_text(text)
    monkeypatch.setenv("IMAGEBATCH_CATALOG_FILE", str(catalog))
    monkeypatch.setenv("IMAGEBATCH_SIM_BATCH_UNSUPPORTED", "gpt-image-2.6-sunburst")
    client = make_sim().client(max_retries=0)

    refused = wait_status(
        client, submit(client, [gen_line("a", model="gpt-image-2.6-sunburst")]).id
    )
    assert refused.status == "failed"
    assert refused.errors and refused.errors.data
    first = refused.errors.data[0]
    assert (first.code, first.line, first.param) == ("unsupported_model", 1, "body.model")
    assert first.message == "The model 'gpt-image-2.6-sunburst' is not supported by the Batch API."
    assert refused.request_counts is not None and refused.request_counts.total == 0
    assert refused.output_file_id is None and refused.error_file_id is None

    # The catalog (the simulator's, from IMAGEBATCH_CATALOG_FILE) decides the rest: flare batches.
    flare = wait_status(client, submit(client, [gen_line("b", model="gpt-image-2.6-flare")]).id)
    assert flare.status == "completed"
    # A model the catalog marks `batch = false` is still refused without the flag.
    old = wait_status(client, submit(client, [gen_line("c", model="gpt-image-2.5-flare")]).id)
    assert old.status == "failed" and old.errors and old.errors.data
    assert old.errors.data[0].code == "unsupported_model"
    # Batch support only: the model still answers sync requests and is still listed.
    image = client.images.generate(model="gpt-image-2.6-sunburst", prompt="a mug", quality="low")
    assert image.data
    assert client.models.retrieve("gpt-image-2.6-sunburst").shutdown_date is None
