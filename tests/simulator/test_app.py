"""Settings from flags and environment, the operator's catalog, the in-process ASGI app, the spec."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx2
import openai
import pytest

from service.catalog import DEFAULT_CATALOG_FILE
from simulator.app import create_app
from simulator.cli import parse_config
from simulator.config import SimulatorConfig
from tests.simulator import schemas
from tests.simulator.conftest import gen_line, jsonl, wait_status


def test_flags_override_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGEBATCH_SIM_RATE", "7.5")
    monkeypatch.setenv("IMAGEBATCH_SIM_RPM", "30")
    monkeypatch.setenv("IMAGEBATCH_CATALOG_FILE", str(tmp_path / "service.toml"))
    config = parse_config(
        [
            "--rpm",
            "90",
            "--data-dir",
            str(tmp_path),
            "--plain-images",
            "--moderation-words",
            "a, b=violence",
        ]
    )
    assert (config.rate, config.rpm, config.data_dir, config.plain_images) == (
        7.5,
        90,
        tmp_path,
        True,
    )
    assert config.catalog_file == tmp_path / "service.toml"
    assert config.moderation_rules() == {"a": "other", "b": "violence"}
    monkeypatch.setenv("IMAGEBATCH_SIM_CATALOG_FILE", str(tmp_path / "sim.toml"))
    assert parse_config([]).catalog_file == tmp_path / "sim.toml"
    assert parse_config(["--catalog-file", "x.toml"]).catalog_file == Path("x.toml")


def test_bad_flag_values_exit_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--fail-rate", "2"])
    assert "--fail-rate" in capsys.readouterr().err


def test_an_operator_catalog_decides_which_models_exist(make_sim, tmp_path):
    text = DEFAULT_CATALOG_FILE.read_text()
    custom = tmp_path / "catalog.toml"
    # The operator confirmed batch support for sunburst.
    custom.write_text(
        text.replace(
            '[models."gpt-image-2.5-sunburst"]\ncreated = 1788825600\nowned_by = "system"\nbatch = false',
            '[models."gpt-image-2.5-sunburst"]\ncreated = 1788825600\nowned_by = "system"\nbatch = true',
        )
    )
    assert custom.read_text() != text
    client = make_sim(catalog_file=custom).client()
    f = client.files.create(
        file=("in.jsonl", jsonl([gen_line("a", model="gpt-image-2.5-sunburst")])), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/images/generations", completion_window="24h"
    )
    assert wait_status(client, batch.id).status == "completed"


def test_the_app_runs_in_process_under_asgi_transport(tmp_path):
    app = create_app(
        SimulatorConfig(data_dir=tmp_path, rate=5000, validate_seconds=0, finalize_seconds=0)
    )

    async def scenario() -> None:
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://sim")
        client = openai.AsyncOpenAI(api_key="sk-x", base_url="http://sim/v1", http_client=http)
        img = await client.images.generate(model="gpt-image-2", prompt="in process", quality="low")
        assert img.data and img.usage and img.usage.output_tokens == 196
        f = await client.files.create(
            file=("in.jsonl", jsonl([gen_line("a"), gen_line("b")])), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=f.id, endpoint="/v1/images/generations", completion_window="24h"
        )
        for _ in range(200):
            batch = await client.batches.retrieve(batch.id)
            if batch.status == "completed":
                break
            await asyncio.sleep(0.02)
        assert batch.status == "completed"
        content = await client.files.content(batch.output_file_id or "")
        assert len(content.text.splitlines()) == 2
        await app.state.sim.stop()
        await http.aclose()

    asyncio.run(scenario())


def test_the_schema_extract_matches_the_spec():
    path = schemas.spec_path()
    if path is None:
        pytest.skip("openai-openapi.yaml is not on this machine (set IMAGEBATCH_OPENAI_SPEC)")
    committed = json.loads(schemas.EXTRACT.read_text())["schemas"]
    assert schemas.extract(schemas.load_spec(path)) == committed


def test_a_bug_answers_openais_500_with_a_request_id(tmp_path, monkeypatch):
    app = create_app(SimulatorConfig(data_dir=tmp_path))

    def broken(_batch_id: str) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(app.state.sim.engine, "get", broken)

    async def scenario() -> httpx2.Response:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://sim") as http:
            resp = await http.get("/v1/batches/batch_x")
        await app.state.sim.stop()
        return resp

    resp = asyncio.run(scenario())
    assert resp.status_code == 500
    assert resp.headers["x-request-id"].startswith("req_")
    schemas.check("ErrorResponse", resp.json())
    assert resp.json()["error"]["type"] == "server_error"
