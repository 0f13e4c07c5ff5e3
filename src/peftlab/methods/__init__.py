"""Built-in methods: importing this package registers them (one file per method)."""

from peftlab.methods import bitfit, lora  # noqa: F401
from peftlab.methods import p_tuning, prefix_tuning, prompt_tuning  # noqa: F401
from peftlab.methods import bottleneck, compacter, fusion  # noqa: F401
from peftlab.methods import dylora, flora  # noqa: F401
from peftlab.methods import qlora  # noqa: F401  (after lora: both read peft's LORA configs)
from peftlab.methods import galore  # noqa: F401
