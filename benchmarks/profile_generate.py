"""Where Engine.generate and diffusers' pipeline spend their time (cProfile), on the tiny model, CPU.

    python benchmarks/profile_generate.py                 # batch 1 and 4, 10 calls per side
    python benchmarks/profile_generate.py --batches 4 --calls 20 --dump /tmp/prof

Prints, per side, the time per call in the stages both sides share (text encoding, UNet calls,
scheduler steps, VAE decode, conversion to PIL) and in what only the engine does (provenance
metadata), then two micro-benchmarks that explain the difference: the engine's per-image
provenance record, and a UNet call under torch.inference_mode (engine) vs torch.no_grad (diffusers).
cProfile inflates Python-heavy code; use the stage times to compare the sides, not as absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_generate as bench  # noqa: E402  (sets HF_HUB_OFFLINE, warning filters)
import torch  # noqa: E402

# (label, file suffix, function name): cumulative time per call of each stage.
STAGES = [
    ("text encoding (encode_prompt)", "pipeline_stable_diffusion_xl.py", "encode_prompt"),
    ("UNet forward", "unet_2d_condition.py", "forward"),
    ("scheduler.step", "scheduling_euler_discrete.py", "step"),
    ("scheduler.scale_model_input", "scheduling_euler_discrete.py", "scale_model_input"),
    ("VAE decode (decoder forward)", "autoencoders/vae.py", "forward"),
    ("engine: vae.decode incl. checks", "engine/vae.py", "decode"),
    ("engine: provenance.build_metadata", "engine/provenance.py", "build_metadata"),
    ("  of which package_versions", "engine/provenance.py", "package_versions"),
    ("engine: pixels_to_pil", "engine/vae.py", "pixels_to_pil"),
    ("diffusers: image_processor.postprocess", "image_processor.py", "postprocess"),
]


def stage_times(stats: pstats.Stats, calls: int) -> dict[str, float]:
    out = {}
    for label, suffix, func in STAGES:
        total = 0.0
        for (filename, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():
            if name == func and filename.replace("\\", "/").endswith(suffix):
                total += cumulative
        out[label] = total / calls
    return out


def micro(engine, pipe, batch: int, repeats: int = 30) -> None:
    from engine.provenance import package_versions

    package_versions()
    start = time.perf_counter()
    for _ in range(200):
        package_versions()
    per_image = (time.perf_counter() - start) / 200
    print(f"\nprovenance.package_versions(): {per_image * 1e3:.2f} ms per call; build_metadata calls it once per "
          f"image -> {per_image * batch * 1e3:.1f} ms per batch-{batch} generate (diffusers: nothing similar)")

    unet = pipe.unet
    rows = 2 * batch
    x = torch.randn(rows, 4, 16, 16)
    cond = {
        "encoder_hidden_states": torch.randn(rows, 77, unet.config.cross_attention_dim),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(rows, unet.config.projection_class_embeddings_input_dim
                                       - 6 * unet.config.addition_time_embed_dim),
            "time_ids": torch.randn(rows, 6),
        },
    }
    t = torch.tensor(500.0)

    def call():
        return unet(x, t, return_dict=False, **cond)[0]

    times = {"no_grad (diffusers)": [], "inference_mode (engine)": []}
    contexts = {"no_grad (diffusers)": torch.no_grad, "inference_mode (engine)": torch.inference_mode}
    for name, ctx in contexts.items():
        with ctx():
            call()
    for index in range(repeats):
        names = list(contexts) if index % 2 == 0 else list(reversed(contexts))
        for name in names:
            with contexts[name]():
                start = time.perf_counter()
                for _ in range(5):
                    call()
                times[name].append((time.perf_counter() - start) / 5)
    medians = {name: statistics.median(values) for name, values in times.items()}
    saved = medians["no_grad (diffusers)"] - medians["inference_mode (engine)"]
    print(f"UNet call, CFG batch {rows} at 16x16 latents: "
          + ", ".join(f"{name} {value * 1e3:.2f} ms" for name, value in medians.items())
          + f" -> inference_mode saves {saved * 1e3:.2f} ms per step, {saved * 20 * 1e3:.1f} ms per 20-step generate")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dump", type=Path, help="folder for the raw .pstats files (snakeviz, pstats)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from engine import GenerationRequest
    from engine.schedulers import build_scheduler

    profile = bench.PROFILES["cpu-tiny"]
    engine, pipe, _ = bench.build(profile, torch.device("cpu"), torch.float32, 1234)
    pipe.scheduler = build_scheduler(profile.scheduler, pipe.scheduler.config)
    for batch in (int(b) for b in args.batches.split(",")):
        request = GenerationRequest(prompt=bench.PROMPT, width=profile.width, height=profile.height,
                                    num_images=batch, seed=1, steps=profile.steps,
                                    guidance_scale=profile.guidance, scheduler=profile.scheduler, mode="fast")

        def run_engine():
            return engine.generate(request)

        def run_diffusers():
            return pipe(prompt=bench.PROMPT, width=profile.width, height=profile.height, num_images_per_prompt=batch,
                        num_inference_steps=profile.steps, guidance_scale=profile.guidance, output_type="pil",
                        generator=[torch.Generator("cpu").manual_seed(1 + i) for i in range(batch)])

        results = {}
        for name, fn in (("engine", run_engine), ("diffusers", run_diffusers)):
            fn()  # warm-up
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.enable()
            for _ in range(args.calls):
                fn()
            profiler.disable()
            wall = (time.perf_counter() - start) / args.calls
            stats = pstats.Stats(profiler)
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                stats.dump_stats(args.dump / f"{name}-batch{batch}.pstats")
            results[name] = (wall, stage_times(stats, args.calls))
        print(f"\n== batch {batch}, {args.calls} calls per side under cProfile, {torch.get_num_threads()} thread(s)")
        print(f"{'stage (cumulative ms per call)':42s} {'engine':>9s} {'diffusers':>10s}")
        print(f"{'whole call':42s} {results['engine'][0] * 1e3:9.1f} {results['diffusers'][0] * 1e3:10.1f}")
        for label, _suffix, _func in STAGES:
            e, d = results["engine"][1][label], results["diffusers"][1][label]
            print(f"{label:42s} {e * 1e3:9.1f} {d * 1e3:10.1f}")
        micro(engine, pipe, batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
