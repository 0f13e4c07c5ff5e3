"""Memory needed to fine-tune or serve a model, per method, validated against measured peaks.

    from peftlab.estimate import estimate, fit
    e = estimate("llama-2-7b", "lora", {"r": 16}, batch=4, seq=2048)
    print(e.table())                     # each term, each phase of the step, the peak
    e.total, e.peak_phase, e.phases      # the peak (largest phase) and what each phase holds
    for f in fit("24GB", "llama-2-7b", ["full", "lora"], batch=4, seq=2048):
        print(f.method, f.fits, f.max_batch, f.max_seq)

Parameter counts come from the real :func:`peftlab.attach` on the meta device (full fine-tuning is
the registered ``"full"`` method); activations from a closed form after Korthikanti et al. 2022;
the peak of a training step from a phase model (:mod:`peftlab.estimate.phases`), validated against
published GPU peaks (:mod:`peftlab.estimate.published`). A method that lengthens the sequence says so through
``Method.extra_sequence_tokens`` / ``Method.extra_key_tokens``. QLoRA storage (``quantize="nf4"``)
and GaLore (``optimizer="galore"``) are modelled settings, not registered methods.
``docs/estimate.md`` explains every term and the validation against measured peaks.
"""

from __future__ import annotations

from peftlab.estimate.arch import UnknownModelError, known
from peftlab.estimate.core import OPTIMIZERS, TERMS, Estimate, Fit, estimate, fit, parse_size
from peftlab.estimate.phases import COMPONENTS, PHASES
from peftlab.estimate.presets import PRESETS

__all__ = ["COMPONENTS", "OPTIMIZERS", "PHASES", "PRESETS", "TERMS", "Estimate", "Fit", "UnknownModelError", "estimate",
           "fit", "known", "parse_size"]
