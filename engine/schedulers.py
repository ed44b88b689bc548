"""Samplers by name: diffusers scheduler classes, configured from the model's own scheduler config.

Leonardo's names (KLMS, EULER_DISCRETE, ...) are accepted as aliases so that Leonardo requests
run unchanged. A fresh scheduler is built for every generation: schedulers carry step state.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    class_name: str
    label: str  # the A1111-style sampler name written into PNG "parameters"
    options: dict = field(default_factory=dict)


SCHEDULERS = {
    spec.name: spec
    for spec in [
        SchedulerSpec("euler", "EulerDiscreteScheduler", "Euler"),
        SchedulerSpec("euler_a", "EulerAncestralDiscreteScheduler", "Euler a"),
        SchedulerSpec("lms", "LMSDiscreteScheduler", "LMS"),
        SchedulerSpec("ddim", "DDIMScheduler", "DDIM"),
        SchedulerSpec("pndm", "PNDMScheduler", "PLMS"),
        SchedulerSpec("heun", "HeunDiscreteScheduler", "Heun"),
        SchedulerSpec("unipc", "UniPCMultistepScheduler", "UniPC"),
        SchedulerSpec("dpm_solver", "DPMSolverMultistepScheduler", "DPM++ 2M",
                      {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
        SchedulerSpec("dpmpp_2m_karras", "DPMSolverMultistepScheduler", "DPM++ 2M Karras",
                      {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
        SchedulerSpec("dpmpp_2m_sde_karras", "DPMSolverMultistepScheduler", "DPM++ 2M SDE Karras",
                      {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    ]
}

# Leonardo's `scheduler` values and common spellings -> our names.
ALIASES = {
    "klms": "lms",
    "euler_discrete": "euler",
    "euler_ancestral_discrete": "euler_a",
    "euler_ancestral": "euler_a",
    "dpm++_2m_karras": "dpmpp_2m_karras",
    "dpm++ 2m karras": "dpmpp_2m_karras",
    "dpm++_2m": "dpm_solver",
    "dpmpp_2m": "dpm_solver",
    "leonardo": "dpmpp_2m_karras",  # Leonardo's own sampler is unpublished; this is our stand-in
    "plms": "pndm",
}

DEFAULT_SCHEDULER = "dpmpp_2m_karras"


def canonical_name(name: str) -> str:
    """Our name for a scheduler name or alias (case-insensitive); ValueError lists the valid ones."""
    key = name.strip().lower()
    key = ALIASES.get(key, ALIASES.get(key.replace("-", "_"), key.replace("-", "_")))
    if key not in SCHEDULERS:
        valid = sorted(SCHEDULERS) + sorted(n.upper() for n in ALIASES)
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(valid)}")
    return key


def build_scheduler(name: str, base_config):
    """A fresh diffusers scheduler of the named kind, on the model's training noise schedule."""
    import diffusers

    spec = SCHEDULERS[canonical_name(name)]
    return getattr(diffusers, spec.class_name).from_config(base_config, **spec.options)
