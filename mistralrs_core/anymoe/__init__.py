"""AnyMoE: a dense model's MLPs at chosen layers become a mixture of experts whose experts
come from fine-tuned models of the same architecture or from LoRA adapters, routed by a gate
trained on a small prompt dataset (``Runner(anymoe_config=AnyMoeConfig(...))``).

``setup.py`` checks the config, ``experts.py`` builds experts, ``layer.py`` routes,
``training.py`` trains the gates, ``gates.py`` saves and loads them, ``attach.py`` puts it
together on a loaded pipeline.
"""
from mistralrs_core.anymoe.attach import AnyMoeModel, attach_anymoe
from mistralrs_core.anymoe.layer import AnyMoeMlp
from mistralrs_core.anymoe.setup import AnyMoeSetup

__all__ = ["AnyMoeMlp", "AnyMoeModel", "AnyMoeSetup", "attach_anymoe"]
