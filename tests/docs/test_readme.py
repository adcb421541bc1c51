"""The README is what a new user reads first: it must stay true to the code."""

from pathlib import Path

from service.settings import Settings

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_readme_opens_with_the_two_commands() -> None:
    head = README[:800]
    assert "make run" in head and "make test" in head


def test_every_setting_is_documented() -> None:
    missing = []
    for name in Settings.model_fields:
        env = (
            name.upper()
            if name in ("openai_api_key", "openai_base_url", "openai_webhook_secret")
            else f"IMAGEBATCH_{name.upper()}"
        )
        if f"`{env}`" not in README:
            missing.append(env)
    assert not missing, f"settings missing from README's table: {missing}"
