"""Every peft task type loads both ways, for LoRA and the three prompt methods: the same outputs
(fp32, 1e-5) from peft and from peftlab on one adapter folder, whichever library wrote it."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftlab
from tests.conftest import perturb

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

_D = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
          max_position_embeddings=64)


def _bert(cls: str, **kw):
    def build():
        import transformers

        torch.manual_seed(0)
        return getattr(transformers, cls)(transformers.BertConfig(**_D, **kw)).eval()
    return build


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **_D)).eval()


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                               decoder_start_token_id=0, pad_token_id=0)).eval()


TASKS = {"SEQ_CLS": (_bert("BertForSequenceClassification", num_labels=3), ["query", "value"]),
         "TOKEN_CLS": (_bert("BertForTokenClassification", num_labels=3), ["query", "value"]),
         "QUESTION_ANS": (_bert("BertForQuestionAnswering"), ["query", "value"]),
         "FEATURE_EXTRACTION": (_bert("BertModel"), ["query", "value"]),
         "CAUSAL_LM": (_llama, ["q_proj", "v_proj"]),
         "SEQ_2_SEQ_LM": (_t5, ["q", "v"])}
METHODS = ["lora", "prompt_tuning", "p_tuning", "prefix_tuning"]
X = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(1))


def outputs(model, task: str) -> torch.Tensor:
    kw = {"decoder_input_ids": X[:, :3]} if task == "SEQ_2_SEQ_LM" else {}
    with torch.no_grad():
        o = model(input_ids=X, attention_mask=torch.ones_like(X), **kw)
    if getattr(o, "start_logits", None) is not None:
        return torch.stack([o.start_logits, o.end_logits])
    t = o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state
    return t[:, -X.shape[1]:] if t.dim() == 3 and task != "SEQ_2_SEQ_LM" else t  # peft keeps virtual positions


def peft_config(method: str, task: str):
    import peft

    if method == "lora":
        return peft.LoraConfig(task_type=task, r=2, target_modules=TASKS[task][1])
    cls = {"prompt_tuning": peft.PromptTuningConfig, "p_tuning": peft.PromptEncoderConfig,
           "prefix_tuning": peft.PrefixTuningConfig}[method]
    return cls(task_type=task, num_virtual_tokens=3)


def _runs_in_peft(model) -> None:
    try:
        model(input_ids=X, attention_mask=torch.ones_like(X))
    except ValueError as e:  # peft's own check of the model's forward signature
        if "past key values" in str(e):
            pytest.skip(f"peft refuses prefix tuning on this model with this transformers release: {e}")
        raise
    except TypeError:
        pass


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task", sorted(TASKS))
def test_peft_file_loads_in_peftlab(task, method, tmp_path):
    import peft

    build, _ = TASKS[task]
    pm = peft.get_peft_model(build(), peft_config(method, task))
    perturb({k: p for k, p in pm.named_parameters() if p.requires_grad}, scale=0.3)
    pm.eval()
    if method == "prefix_tuning" and task != "SEQ_2_SEQ_LM":
        _runs_in_peft(pm)
    want = outputs(pm, task)
    pm.save_pretrained(tmp_path)
    model = build()
    peftlab.load(model, tmp_path)
    torch.testing.assert_close(outputs(model, task), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task", sorted(TASKS))
def test_peftlab_file_loads_in_peft(task, method, tmp_path):
    from peft import PeftModel

    build, targets = TASKS[task]
    model = build()
    heads = [n for n in ("classifier", "qa_outputs") if hasattr(model, n)]
    opts = {"target_modules": targets} if method == "lora" else {"num_virtual_tokens": 3}
    peftlab.attach(model, method, **opts, **({"modules_to_save": heads} if heads else {}))
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    want = outputs(model, task)
    peftlab.save(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(build(), tmp_path).eval()
    if method == "prefix_tuning" and task != "SEQ_2_SEQ_LM":
        _runs_in_peft(loaded)
    torch.testing.assert_close(outputs(loaded, task), want, atol=1e-5, rtol=1e-5)
