"""The diffusers tools end to end over REST, against a real genq (embedded NATS JetStream,
SQLite, local files) whose tools point at tiny random model folders."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from conftest import png_bytes, read_events, start_live, stop_live  # noqa: E402
from diffusion_models import TEST_OPTIONS, image_edit_config, sd_upscaler_dir, text_to_image_dir, unet_lora_dir  # noqa: E402
from helpers import assert_error  # noqa: E402

pytestmark = pytest.mark.ml


def config() -> dict:
    return {
        "tools": [
            {
                "tool": {"kind": "textToImage", "name": "text-to-image"},
                "model": str(text_to_image_dir()),
                "variants": [{"name": "base", "steps": 2}, {"name": "lora", "lora": str(unet_lora_dir()), "steps": 2}],
                "maxWorkers": 1,
                "options": TEST_OPTIONS,
            },
            {
                "tool": {"kind": "upscale", "name": "upscale"},
                "variants": [{"name": "sd-x4", "backend": "diffusers", "model": str(sd_upscaler_dir()), "steps": 2},
                             {"name": "lanczos"}],
                "maxWorkers": 1,
                "options": TEST_OPTIONS,
            },
            {**image_edit_config("image-edit"), "maxWorkers": 1},
        ]
    }


@pytest.fixture
async def live(tmp_path):
    lv, server, task = await start_live(tmp_path, config())
    try:
        yield lv
    finally:
        await stop_live(lv, server, task)


async def download(c, f: dict) -> Image.Image:
    r = await c.get(f["url"])
    assert r.status_code == 200 and r.headers["content-type"] == f["content_type"]
    im = Image.open(io.BytesIO(r.content))
    im.load()
    return im


async def test_text_to_image_two_images_and_determinism(live):
    async with live.client() as c:
        tools = {t["name"]: t for t in (await c.get("/v1/tools")).json()["tools"]}
        assert tools["text-to-image"]["kind"] == "textToImage" and tools["text-to-image"]["variants"] == ["base", "lora"]
        body = {"tool": "text-to-image", "params": {"prompt": "a photo of the cat", "num_images": 2, "seed": 42}, "wait": 60}
        r = await c.post("/v1/jobs", json=body)
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["status"] == "succeeded" and job["result"]["seed"] == 42 and job["variant"] == "base"
        files = job["result"]["files"]
        assert [f["name"] for f in files] == ["image-1.png", "image-2.png"]
        ims = [await download(c, f) for f in files]
        assert all(im.size == (64, 64) and im.mode == "RGB" for im in ims)
        assert [json.loads(im.text["genq"])["seed"] for im in ims] == [42, 43]
        assert job["result"]["metrics"]["steps"] == 2 and job["result"]["metrics"]["num_images"] == 2
        # The same seed and params give the same bytes; the first file is /result.
        again = (await c.post("/v1/jobs", json=body)).json()
        assert [f["size_bytes"] for f in again["result"]["files"]] == [f["size_bytes"] for f in files]
        first = await c.get(f"/v1/jobs/{again['id']}/result")
        assert first.content == (await c.get(files[0]["url"])).content
        # Multipart with plain form fields and another variant.
        r = await c.post("/v1/jobs", files=[("tool", (None, "text-to-image")), ("variant", (None, "lora")),
                                            ("prompt", (None, "a dog")), ("width", (None, "96")), ("seed", (None, "1")),
                                            ("sampler", (None, "euler_a")), ("wait", (None, "60"))])
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        assert (await download(c, r.json()["result"]["files"][0])).size == (96, 64)


async def test_params_out_of_range_are_422(live):
    async with live.client() as c:
        bad = [
            {"prompt": "x", "num_images": 5},
            {"prompt": "x", "num_images": 0},
            {"prompt": "x", "width": 60},
            {"prompt": "x", "height": 4104},
            {"prompt": "x", "steps": 0},
            {"prompt": "x", "cfg_scale": 31},
            {"prompt": "x", "sampler": "euler_fancy"},
            {"prompt": "x", "output_format": "gif"},
            {"prompt": ""},
            {"negative_prompt": "no prompt"},
            {"prompt": "x", "strength": 0.5},
        ]
        for params in bad:
            r = await c.post("/v1/jobs", json={"tool": "text-to-image", "params": params})
            assert_error(r, 422, "validation_error")
        assert_error(await c.post("/v1/jobs", json={"tool": "text-to-image", "variant": "nope", "params": {"prompt": "x"}}),
                     422, "validation_error")
        assert (await c.get("/v1/jobs")).json()["total"] == 0


async def test_progress_events_every_step_then_cancel_mid_run(live):
    async with live.client() as c:
        job = (await c.post("/v1/jobs", json={"tool": "text-to-image", "params": {"prompt": "a cat", "steps": 4}})).json()
        events = await read_events(c, job["id"])
        steps = [(d["step"], d["steps"]) for n, d in events if n == "progress"]
        assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
        assert [d["status"] for n, d in events if n == "status"][-1] == "succeeded"

        # A long run, cancelled once it has made progress: the worker is free at once.
        long = (await c.post("/v1/jobs", json={"tool": "text-to-image", "params": {"prompt": "a cat", "steps": 150, "num_images": 4}})).json()
        deadline = time.monotonic() + 30
        while (j := (await c.get(f"/v1/jobs/{long['id']}")).json())["progress"] == 0:
            assert time.monotonic() < deadline and j["status"] in ("queued", "running")
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        r = await c.post(f"/v1/jobs/{long['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        r = await c.post("/v1/jobs", json={"tool": "text-to-image", "params": {"prompt": "after"}, "wait": 30})
        assert r.json()["status"] == "succeeded"
        assert time.monotonic() - t0 < 5
        q = (await c.get("/v1/queues/text-to-image")).json()
        assert q["active"] == 0 and q["queued"] == 0


async def test_upscale_x4_through_diffusers(live):
    async with live.client() as c:
        r = await c.post("/v1/jobs", files=[("tool", (None, "upscale")), ("variant", (None, "sd-x4")), ("scale", (None, "4")),
                                            ("wait", (None, "60")), ("image", ("a.png", png_bytes(20, 12), "image/png"))])
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["status"] == "succeeded" and job["result"]["metrics"]["backend"] == "diffusers"
        im = await download(c, job["result"]["files"][0])
        assert im.size == (80, 48) and im.mode == "RGB"
        same = (await c.post("/v1/jobs", json={"tool": "upscale", "variant": "sd-x4", "params": {"scale": 4},
                                               "inputs": {"image": "data:image/png;base64," + __import__("base64").b64encode(png_bytes(20, 12)).decode()},
                                               "wait": 60})).json()
        assert (await c.get(same["result"]["files"][0]["url"])).content == (await c.get(job["result"]["files"][0]["url"])).content
        assert_error(await c.post("/v1/jobs", json={"tool": "upscale", "variant": "sd-x4", "params": {"scale": 8}}), 422, "validation_error")


async def test_image_edit_each_variant(live):
    async with live.client() as c:
        src = png_bytes(128, 64)
        seen = {}
        for variant, steps in (("4step", 4), ("8step", 8), ("40step", 3)):
            fields = [("tool", (None, "image-edit")), ("variant", (None, variant)), ("instruction", (None, "make the sky blue")),
                      ("seed", (None, "5")), ("wait", (None, "90")), ("image", ("photo.png", src, "image/png"))]
            if variant == "40step":
                fields.append(("steps", (None, "3")))
            r = await c.post("/v1/jobs", files=fields)
            assert r.status_code == 200, r.text
            job = r.json()
            assert job["status"] == "succeeded", job
            assert job["result"]["seed"] == 5 and job["result"]["metrics"]["steps"] == steps
            files = job["result"]["files"]
            assert [f["name"] for f in files] == ["result.png"]
            im = await download(c, files[0])
            assert im.size == (128, 64) and json.loads(im.text["genq"])["variant"] == variant
            seen[variant] = (await c.get(files[0]["url"])).content
        assert len(set(seen.values())) == 3
        # The same seed and variant again: the same bytes, after the model switched variants twice.
        r = await c.post("/v1/jobs", json={"tool": "image-edit", "variant": "4step", "wait": 90,
                                           "params": {"instruction": "make the sky blue", "seed": 5},
                                           "inputs": {"image": "data:image/png;base64," + __import__("base64").b64encode(src).decode()}})
        assert (await c.get(r.json()["result"]["files"][0]["url"])).content == seen["4step"]


async def test_image_edit_rejects_bad_params_and_inputs(live):
    async with live.client() as c:
        img = ("image", ("a.png", png_bytes(32, 32), "image/png"))
        for fields in (
            [("instruction", (None, "x" * 2001)), img],
            [("instruction", (None, "x")), ("true_cfg_scale", (None, "25")), img],
            [("instruction", (None, "x")), ("steps", (None, "0")), img],
            [("instruction", (None, "x")), ("seed", (None, "-1")), img],
            [("instruction", (None, "x")), ("cfg_scale", (None, "2")), img],
            [img],
            [("instruction", (None, "x"))],
            [("instruction", (None, "x")), img, img, img, img],
        ):
            r = await c.post("/v1/jobs", files=[("tool", (None, "image-edit")), *fields])
            assert_error(r, 422, "validation_error")
        assert (await c.get("/v1/jobs")).json()["total"] == 0


async def test_demo_models_run_every_tool(tmp_path):
    """The demo config (tiny models for all three tools) serves a job of each."""
    from genq.worker.tools.tiny_models import write_demo_models

    cfg = write_demo_models(tmp_path / "models")
    lv, server, task = await start_live(tmp_path, cfg)
    try:
        async with lv.client() as c:
            src = "data:image/png;base64," + __import__("base64").b64encode(png_bytes(64, 64)).decode()
            for body in (
                {"tool": "text-to-image", "params": {"prompt": "a red sky", "steps": 2}},
                {"tool": "image-edit", "variant": "4step", "params": {"instruction": "make it blue"}, "inputs": {"image": src}},
                {"tool": "upscale", "variant": "sd-x4", "params": {"scale": 2}, "inputs": {"image": src}},
            ):
                r = await c.post("/v1/jobs", json={**body, "wait": 90})
                assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    finally:
        await stop_live(lv, server, task)
