"""The diffusers engine, served from tiny FLUX.2 checkpoints saved to disk.

Tiny [klein] and [dev] pipelines (random weights) are written with
`save_pretrained`, then loaded back through the settings' `models` table and
`from_pretrained`: the path a real checkpoint takes. No test touches the network.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from fluxserve.checkpoints import ModelRoute, local_checkpoint, plan_engines
from fluxserve.engines import diffusers as diffusers_module
from fluxserve.engines import make_engine
from fluxserve.engines.base import Engine, GenerationRequest
from fluxserve.engines.diffusers import DiffusersEngine
from fluxserve.engines.routed import RoutedEngine
from fluxserve.engines.tiny import TinyEngine
from fluxserve.errors import EngineError, EngineUnavailable
from fluxserve.settings import Settings
from fluxserve.tasks import MODELS

from conftest import make_settings, run_service
from hooked_engine import Hooked

SIZE = 128


def klein_routes(folder: Path, **options: Any) -> dict[str, Any]:
    return {model: {"checkpoint": str(folder), **options} for model in MODELS}


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(tmp_path / "data", **overrides)


@pytest.fixture(scope="module")
def klein(klein_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    """The diffusers engine as make_engine builds it from a models table, loaded."""
    settings = settings_for(
        tmp_path_factory.mktemp("s"), engine="diffusers", models=klein_routes(klein_dir, steps=3)
    )
    routed = make_engine(settings)
    assert isinstance(routed, RoutedEngine)
    routed.load()
    engine = routed.engines["flux-2-pro"]
    assert isinstance(engine, DiffusersEngine)
    return engine


def draw(engine: Engine, **fields: Any) -> tuple[list[Image.Image], list[tuple[int, int]]]:
    values: dict[str, Any] = {
        "prompt": "a lighthouse at dusk",
        "width": SIZE,
        "height": SIZE,
        "seed": 7,
        "model": "flux-2-pro",
        **fields,
    }
    calls: list[tuple[int, int]] = []
    images = engine.generate(
        GenerationRequest(**values), lambda done, total: calls.append((done, total))
    )
    return images, calls


def data_url(width: int, height: int, color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# --- routing and the choice of engine ---------------------------------------------


def test_default_routes_put_every_model_on_klein_4b() -> None:
    settings = Settings()
    assert settings.engine == "auto"
    for model in MODELS:
        route = settings.models[model]
        assert route.checkpoint == "black-forest-labs/FLUX.2-klein-4B"
        assert route.pipeline == "Flux2KleinPipeline"
        assert route.steps == 4


def test_models_table_from_toml_keeps_the_other_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, klein_dir: Path
) -> None:
    config = tmp_path / "fluxserve.toml"
    config.write_text(
        '[models."flux-2-pro"]\n'
        'checkpoint = "black-forest-labs/FLUX.2-dev"\n'
        'pipeline = "Flux2Pipeline"\n'
        "steps = 50\nguidance = 4.0\n"
        'memory_mode = "model_cpu_offload"\n'
        '[models."flux-2-flex"]\n'
        f'checkpoint = "{klein_dir}"\n'
    )
    monkeypatch.setenv("FLUXSERVE_CONFIG", str(config))
    settings = Settings()
    pro = settings.models["flux-2-pro"]
    assert (pro.pipeline, pro.steps, pro.guidance, pro.memory_mode) == (
        "Flux2Pipeline",
        50,
        4.0,
        "model_cpu_offload",
    )
    assert settings.models["flux-2-flex"].checkpoint == str(klein_dir)
    assert settings.models["flux-2-pro-edit"] == ModelRoute()


def test_unknown_model_in_the_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'flux-3'"):
        settings_for(tmp_path, models={"flux-3": {}})


def test_presence_is_read_from_disk_only(
    tmp_path: Path, klein_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert local_checkpoint(ModelRoute(checkpoint=str(klein_dir))) == klein_dir
    assert local_checkpoint(ModelRoute(checkpoint=str(tmp_path / "absent"))) is None
    assert local_checkpoint(ModelRoute(checkpoint="black-forest-labs/FLUX.2-klein-4B")) is None


def test_auto_falls_back_to_tiny_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(tmp_path, models=klein_routes(tmp_path / "absent"))
    engine = make_engine(settings)
    assert isinstance(engine, TinyEngine)
    assert "every image is noise" in caplog.text
    assert "fluxserve models pull" in caplog.text


def test_auto_mixes_real_and_tiny_per_model(tmp_path: Path, klein_dir: Path) -> None:
    routes = {"flux-2-pro": {"checkpoint": str(klein_dir)}, "flux-2-flex": {}}
    settings = settings_for(tmp_path, models=routes)
    plans = {plan.model: plan for plan in plan_engines(settings, MODELS)}
    assert plans["flux-2-pro"].engine == "diffusers"
    assert plans["flux-2-flex"].engine == "tiny" and plans["flux-2-flex"].fell_back
    engine = make_engine(settings, ["flux-2-pro", "flux-2-flex"])
    assert isinstance(engine, RoutedEngine)
    assert engine.name_for("flux-2-pro") == "diffusers"
    assert engine.name_for("flux-2-flex") == "tiny"


def test_diffusers_refuses_at_start_with_the_reason_and_the_fix(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, engine="diffusers", models=klein_routes(tmp_path / "gone"))
    engine = make_engine(settings)
    with pytest.raises(EngineUnavailable) as caught:
        engine.load()
    message = str(caught.value)
    assert "not on this machine" in message
    assert "does not fall back" in message
    assert "fluxserve models pull flux-2-pro" in message


def test_engine_tiny_overrides_every_route(tmp_path: Path, klein_dir: Path) -> None:
    settings = settings_for(tmp_path, engine="tiny", models=klein_routes(klein_dir))
    assert isinstance(make_engine(settings), TinyEngine)


def test_quantized_mode_without_bitsandbytes_names_the_install(
    tmp_path: Path, klein_dir: Path
) -> None:
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    settings = settings_for(
        tmp_path, engine="diffusers", models=klein_routes(klein_dir, memory_mode="4bit")
    )
    with pytest.raises(EngineUnavailable, match="pip install bitsandbytes"):
        make_engine(settings).load()


# --- the engine on the tiny [klein] checkpoint ------------------------------------


def test_text_to_image_at_the_requested_size(klein: DiffusersEngine) -> None:
    images, calls = draw(klein, width=192, height=128)
    assert images[0].size == (192, 128)
    assert calls == [(1, 3), (2, 3), (3, 3)]  # the route's default steps


def test_steps_from_the_task_override_the_route(klein: DiffusersEngine) -> None:
    _, calls = draw(klein, steps=2)
    assert calls == [(1, 2), (2, 2)]


def test_guidance_reaches_the_pipeline(klein: DiffusersEngine) -> None:
    plain, _ = draw(klein, guidance=1.0, steps=1)
    guided, _ = draw(klein, guidance=6.0, steps=1)
    assert plain[0].tobytes() != guided[0].tobytes()


def test_same_seed_same_pixels(klein: DiffusersEngine) -> None:
    first, _ = draw(klein, seed=42, steps=2)
    again, _ = draw(klein, seed=42, steps=2)
    other, _ = draw(klein, seed=43, steps=2)
    assert first[0].tobytes() == again[0].tobytes()
    assert first[0].tobytes() != other[0].tobytes()


def test_edit_with_several_references(klein: DiffusersEngine) -> None:
    references = (
        Image.new("RGB", (300, 200), "red"),
        Image.new("RGB", (96, 160), "green"),
        Image.new("RGB", (128, 128), "blue"),
    )
    edited, _ = draw(klein, model="flux-2-pro-edit", steps=1, images=references)
    plain, _ = draw(klein, model="flux-2-pro-edit", steps=1)
    assert edited[0].size == (SIZE, SIZE)
    assert edited[0].tobytes() != plain[0].tobytes()


def test_progress_exception_stops_at_that_step(klein: DiffusersEngine) -> None:
    class Stop(Exception):
        pass

    reached: list[int] = []

    def on_progress(done: int, total: int) -> None:
        reached.append(done)
        if done == 2:
            raise Stop

    request = GenerationRequest("x y z", SIZE, SIZE, seed=1, steps=5, model="flux-2-pro")
    with pytest.raises(Stop):
        klein.generate(request, on_progress)
    assert reached == [1, 2]


def test_out_of_memory_fails_the_task_then_the_next_one_works(
    klein: DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    transformer = klein.pipeline_for("flux-2-pro").transformer
    emptied: list[int] = []
    real_empty = diffusers_module.empty_device_cache
    monkeypatch.setattr(
        diffusers_module, "empty_device_cache", lambda: (emptied.append(1), real_empty())
    )

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(transformer, "forward", out_of_memory)
    with pytest.raises(EngineError) as caught:
        draw(klein, steps=1)
    assert 'models."flux-2-pro".memory_mode' in str(caught.value)
    assert "model_cpu_offload" in str(caught.value)
    assert emptied == [1]
    monkeypatch.undo()
    images, _ = draw(klein, steps=1)
    assert images[0].size == (SIZE, SIZE)


# --- the tiny [dev] checkpoint, and more than one checkpoint ----------------------


def test_dev_pipeline_from_a_folder(tmp_path: Path, dev_dir: Path) -> None:
    route = {"checkpoint": str(dev_dir), "pipeline": "Flux2Pipeline", "steps": 2, "guidance": 4.0}
    settings = settings_for(tmp_path, engine="diffusers", models={"flux-2-pro-edit": route})
    engine = make_engine(settings, ["flux-2-pro-edit"])
    engine.load()
    text, calls = draw(engine, model="flux-2-pro-edit")
    assert calls == [(1, 2), (2, 2)]
    assert text[0].size == (SIZE, SIZE)
    references = (Image.new("RGB", (200, 120), "red"), Image.new("RGB", (64, 64), "blue"))
    edited, _ = draw(engine, model="flux-2-pro-edit", images=references)
    assert edited[0].tobytes() != text[0].tobytes()
    guided, _ = draw(engine, model="flux-2-pro-edit", guidance=8.0)
    assert guided[0].tobytes() != text[0].tobytes()


def test_least_recently_used_checkpoint_is_unloaded(
    tmp_path: Path, klein_dir: Path, dev_dir: Path
) -> None:
    dev = {"checkpoint": str(dev_dir), "pipeline": "Flux2Pipeline", "steps": 1}
    models = {"flux-2-pro": dev, "flux-2-flex": {"checkpoint": str(klein_dir), "steps": 1}}
    settings = settings_for(tmp_path, engine="diffusers", models=models, max_loaded_pipelines=1)
    routed = make_engine(settings, ["flux-2-pro", "flux-2-flex"])
    assert isinstance(routed, RoutedEngine)
    routed.load()
    engine = routed.engines["flux-2-pro"]
    assert isinstance(engine, DiffusersEngine)
    assert [key[0] for key in engine.loaded] == [str(dev_dir)]
    draw(routed, model="flux-2-flex")
    assert [key[0] for key in engine.loaded] == [str(klein_dir)]
    draw(routed, model="flux-2-pro")
    assert [key[0] for key in engine.loaded] == [str(dev_dir)]


# --- through the worker: cancellation, timeouts, the status data ------------------


class Gate(Hooked):
    """Wraps an engine; pauses its denoising at `at_step` until released."""

    def __init__(self, inner: Engine, at_step: int, hold: float | None = None) -> None:
        super().__init__(inner, self.gated)
        self.gate_at = at_step
        self.hold = hold
        self.reached = threading.Event()
        self.release = threading.Event()
        self.steps: list[int] = []

    def gated(self, _: object, done: int, __: int) -> None:
        self.steps.append(done)
        if done == self.gate_at:
            self.reached.set()
            if self.hold is not None:
                time.sleep(self.hold)
            else:
                self.release.wait(30)


@pytest.fixture
def gate_release() -> Iterator[list[Gate]]:
    gates: list[Gate] = []
    yield gates
    for gate in gates:
        gate.release.set()


async def test_served_through_the_settings_reports_engine_diffusers(
    tmp_path: Path, klein_dir: Path
) -> None:
    settings = settings_for(tmp_path, engine="diffusers", models=klein_routes(klein_dir, steps=1))
    async with run_service(settings, in_process=True) as service:
        body = {
            "model": "flux-2-flex-edit",
            "input": {
                "prompt": "the jar in image 1 with the logo of image 2",
                "image_urls": [data_url(160, 120, "red"), data_url(96, 96, "blue")],
                "steps": 2,
                "seed": 5,
            },
        }
        response = await service.submit(body)
        assert response.status_code == 200, response.text
        data = await service.wait(response.json()["data"]["task_id"])
    assert data["status"] == "finished", data
    assert data["engine"] == "diffusers"
    assert data["seed"] == 5


async def test_cancel_stops_the_denoising_loop_at_the_next_step(
    tmp_path: Path, klein: DiffusersEngine, gate_release: list[Gate]
) -> None:
    gate = Gate(klein, at_step=2)
    gate_release.append(gate)
    async with run_service(settings_for(tmp_path), engine=gate, in_process=True) as service:
        body = {"model": "flux-2-flex", "input": {"prompt": "a long one", "steps": 10}}
        task_id = (await service.submit(body)).json()["data"]["task_id"]
        assert await asyncio.to_thread(gate.reached.wait, 30)
        worker = service.runtime.worker
        assert worker is not None
        assert not worker.cancel("task-unified-0-notrunng")
        cancel = await service.client.post(
            f"/api/generate/cancel/{task_id}", headers=service.auth()
        )
        assert cancel.status_code == 200, cancel.text
        gate.release.set()
        data = await service.wait(task_id)
    assert data["status"] == "failed"
    assert data["error_message"] == "Task was cancelled"
    assert data["cancelled"] is True
    # Released at step 2, it stopped there: step 3 never ran.
    assert gate.steps == [1, 2]


async def test_timeout_fails_the_task_at_the_next_step(
    tmp_path: Path, klein: DiffusersEngine
) -> None:
    gate = Gate(klein, at_step=1, hold=0.6)
    settings = settings_for(tmp_path, task_timeout=0.3)
    async with run_service(settings, engine=gate, in_process=True) as service:
        body = {"model": "flux-2-flex", "input": {"prompt": "a slow one", "steps": 10}}
        task_id = (await service.submit(body)).json()["data"]["task_id"]
        data = await service.wait(task_id)
        assert data["status"] == "failed"
        assert "timed out" in data["error_message"]
        assert "task_timeout" in data["error_message"]
        assert gate.steps == [1]


# --- the command line -------------------------------------------------------------


def test_doctor_names_each_models_engine(
    tmp_path: Path, klein_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fluxserve.cli import app

    config = tmp_path / "fluxserve.toml"
    config.write_text(
        f'[models."flux-2-pro"]\ncheckpoint = "{klein_dir}"\n'
        '[models."flux-2-flex"]\ncheckpoint = "' + str(tmp_path / "absent") + '"\n'
    )
    monkeypatch.setenv("FLUXSERVE_CONFIG", str(config))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("FLUXSERVE_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "no GPU" in result.output or "cuda:0" in result.output
    assert f"torch {torch.__version__}" in result.output
    assert f"{klein_dir}: present" in result.output
    assert "flux-2-pro: diffusers (Flux2KleinPipeline, 4 steps" in result.output
    assert "flux-2-flex: tiny" in result.output
    assert f"database: sqlite:///{tmp_path / 'data' / 'fluxserve.db'} opens, at migration" in (
        result.output
    )


def test_pull_offline_fails_at_once_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from fluxserve.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["models", "pull", "flux-2-pro"])
    assert result.exit_code == 1
    assert "HF_HUB_OFFLINE is set" in result.output
    assert "black-forest-labs/FLUX.2-klein-4B" in result.output


# --- reference shapes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "reason"),
    [(48, 200, "at least 64 pixels a side"), (1000, 100, "too elongated")],
)
async def test_unusable_data_url_reference_is_a_400_at_submit(
    tmp_path: Path, tiny_engine: Engine, width: int, height: int, reason: str
) -> None:
    async with run_service(settings_for(tmp_path), engine=tiny_engine, in_process=True) as service:
        body = {
            "model": "flux-2-pro-edit",
            "input": {
                "prompt": "put it in the jar",
                "image_urls": [data_url(128, 128, "red"), data_url(width, height, "blue")],
            },
        }
        response = await service.submit(body)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith(f"input.image_urls[1] is {width}x{height}: ")
    assert reason in message


def test_fetched_reference_shape_is_checked_by_the_worker() -> None:
    from fluxserve.reference_shape import check_loaded

    check_loaded([Image.new("RGB", (64, 512))])
    with pytest.raises(Exception, match=r"input.image_urls\[0\] is 64x600: too elongated"):
        check_loaded([Image.new("RGB", (64, 600))])
