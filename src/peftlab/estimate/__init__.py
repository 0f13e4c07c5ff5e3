"""Memory needed to fine-tune or serve a model, per method, validated against measured peaks.

    from peftlab.estimate import estimate, fit
    e = estimate("llama-2-7b", "lora", {"r": 16}, batch=4, seq=2048)
    print(e.table())                     # weights, gradients, optimizer, activations, ... total
    for f in fit("24GB", "llama-2-7b", ["full", "lora"], batch=4, seq=2048):
        print(f.method, f.fits, f.max_batch, f.max_seq)

Parameter counts come from the real :func:`peftlab.attach` on the meta device; activations from
a closed form after Korthikanti et al. 2022. A method that lengthens the sequence says so through
``Method.extra_sequence_tokens`` / ``Method.extra_key_tokens``. QLoRA storage (``quantize="nf4"``)
and GaLore (``optimizer="galore"``) are modelled settings, not registered methods.
``docs/estimate.md`` explains every term and the validation against measured peaks.
"""

from __future__ import annotations

from peftlab.estimate.arch import UnknownModelError, known
from peftlab.estimate.core import OPTIMIZERS, TERMS, Estimate, Fit, estimate, fit, parse_size
from peftlab.estimate.presets import PRESETS

__all__ = ["OPTIMIZERS", "PRESETS", "TERMS", "Estimate", "Fit", "UnknownModelError", "estimate", "fit", "known",
           "parse_size"]
