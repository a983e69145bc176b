"""``LLM.embed`` / ``classify`` / ``score`` / ``reward`` / ``encode``: vLLM's offline pooling methods.

Every prompt and parameter is validated (and tokenized) before any request enters the engine; the
requests then run through the normal scheduler as prompt-only sequences.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from kiln.pooling.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringRequestOutput,
)
from kiln.pooling.params import PoolingParams
from kiln.pooling.spec import check_dimensions
from kiln.pooling.state import PoolingState
from kiln.runtime.inputs import parse_prompt

_TOKEN_TASKS = ("token_embed", "token_classify")


class PoolingMethods:
    """Mixed into ``LLM``; needs ``llm_engine``, ``tokenizer``, ``config`` and ``pooling_spec``."""

    pooling_spec: Any

    # ------------------------------------------------------------------ public methods

    def encode(
        self,
        prompts: Any,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: Any = None,
        pooling_task: str | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[PoolingRequestOutput]:
        """Pooled output of each prompt for ``pooling_task`` ("embed", "classify", "token_embed",
        "token_classify"; default: the model's first task) as a ``PoolingOutput`` tensor."""
        spec = self._require_pooling("encode", None)
        task = pooling_task or spec.supported_tasks[0]
        if task == "score":
            raise ValueError("LLM.encode(): pooling_task='score' takes pairs; use LLM.score()")
        return self._pool(
            "encode", prompts, pooling_params, task, truncate_prompt_tokens, use_tqdm, lora_request,
            tokenization_kwargs,
        )  # fmt: skip

    def embed(
        self,
        prompts: Any,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding vector per prompt (normalised unless ``use_activation=False``)."""
        self._require_pooling("embed", "embed")
        outputs = self._pool(
            "embed", prompts, pooling_params, "embed", truncate_prompt_tokens, use_tqdm, lora_request,
            tokenization_kwargs,
        )  # fmt: skip
        return [EmbeddingRequestOutput.from_base(o) for o in outputs]

    def classify(
        self,
        prompts: Any,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (sigmoid for one label, softmax otherwise)."""
        self._require_pooling("classify", "classify")
        outputs = self._pool(
            "classify", prompts, pooling_params, "classify", truncate_prompt_tokens, use_tqdm,
            lora_request, tokenization_kwargs,
        )  # fmt: skip
        return [ClassificationRequestOutput.from_base(o) for o in outputs]

    def reward(
        self,
        prompts: Any,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[PoolingRequestOutput]:
        """Per-token rewards ``[num_prompt_tokens, num_labels]`` of each prompt."""
        self._require_pooling("reward", "token_classify")
        return self._pool(
            "reward", prompts, pooling_params, "token_classify", truncate_prompt_tokens, use_tqdm,
            lora_request, tokenization_kwargs,
        )  # fmt: skip

    def score(
        self,
        data_1: Any,
        data_2: Any,
        /,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        pooling_params: PoolingParams | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> list[ScoringRequestOutput]:
        """Similarity of each pair: 1-to-1, 1-to-N (``data_1`` one item) or N-to-N. Cross-encoder
        (one-label classifier on the pair's tokens) or cosine similarity of embeddings."""
        spec = self._require_pooling("score", "score")
        if chat_template is not None:
            raise NotImplementedError("LLM.score(): kiln does not implement chat_template")
        if pooling_params is not None and not isinstance(pooling_params, PoolingParams):
            raise ValueError("LLM.score(): pooling_params must be one PoolingParams (or None)")
        firsts = _as_list(data_1)
        seconds = _as_list(data_2)
        if not firsts or not seconds:
            raise ValueError("LLM.score(): data_1 and data_2 must not be empty")
        if len(firsts) != 1 and len(firsts) != len(seconds):
            raise ValueError(
                f"LLM.score(): data_1 has {len(firsts)} items and data_2 {len(seconds)}; pass one data_1 "
                "item (1-to-N) or as many as data_2 (N-to-N)"
            )
        if len(firsts) == 1:
            firsts = firsts * len(seconds)
        if spec.convert == "embed":
            return self._embedding_score(
                firsts, seconds, pooling_params, truncate_prompt_tokens, use_tqdm, tokenization_kwargs
            )
        return self._cross_encoder_score(
            firsts, seconds, pooling_params, truncate_prompt_tokens, use_tqdm, tokenization_kwargs
        )

    # ------------------------------------------------------------------ checks

    def _require_pooling(self, method: str, task: str | None):
        spec = self.pooling_spec
        arch = self.llm_engine.model_config.architecture
        if spec is None:
            raise ValueError(
                f"LLM.{method}() is only supported for pooling models; this LLM runs {arch} with "
                "runner='generate'. Pass runner='pooling' (convert='embed' turns a causal LM into an "
                "embedding model) to use it as a pooling model."
            )
        if task is not None and task not in spec.supported_tasks:
            if task == "score" and spec.convert == "classify":
                fix = f"the model has num_labels={spec.num_labels}; score needs a one-label cross-encoder"
            else:
                fix = f"it supports {list(spec.supported_tasks)} (convert={spec.convert!r})"
            raise ValueError(
                f"LLM.{method}() needs the {task!r} task; this LLM runs {arch} with runner='pooling' and "
                f"{fix}. Load the model with the matching convert=... (embed, classify, reward)."
            )
        return spec

    def _task_params(self, method: str, task: str, params: PoolingParams, index: int) -> PoolingParams:
        """A copy of ``params`` with the task set and the model's defaults filled in; ValueError for
        parameters the task or the model does not support."""
        spec = self.pooling_spec
        where = f"LLM.{method}(): pooling_params[{index}]"
        if not isinstance(params, PoolingParams):
            raise ValueError(f"{where} must be a PoolingParams, got {type(params).__name__}")
        if task not in spec.supported_tasks:
            raise ValueError(
                f"LLM.{method}(): pooling task {task!r} is not supported by this model (runner='pooling', "
                f"convert={spec.convert!r}); it supports {list(spec.supported_tasks)}"
            )
        if params.task is not None and params.task != task:
            raise ValueError(f"{where}: task={params.task!r} but LLM.{method}() runs task {task!r}")
        params = params.clone()
        params.task = task
        valid = params.valid_parameters[task]
        if params.dimensions is not None and "dimensions" not in valid:
            raise ValueError(f"{where}: dimensions applies to embeddings only, not to task {task!r}")
        if params.dimensions is None and "dimensions" in valid:
            params.dimensions = spec.dimensions
        if params.dimensions is not None:
            check_dimensions(spec, params.dimensions, f"LLM.{method}() (runner='pooling')")
        if params.use_activation is None:
            params.use_activation = spec.use_activation.get(task, True)
        return params

    # ------------------------------------------------------------------ requests

    def _token_ids(self, method: str, prompt: Any, index: int, add_special_tokens: bool, truncate):
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = {"prompt_token_ids": prompt}
        parsed = parse_prompt(prompt)
        if "prompt_token_ids" in parsed:
            text, ids = parsed.get("prompt"), list(parsed["prompt_token_ids"])
        else:
            text = parsed["prompt"]
            if self.tokenizer is None:
                raise ValueError(
                    f"LLM.{method}(): prompt {index} is text, but there is no tokenizer (skip_tokenizer_init)"
                )
            ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return text, self._checked_ids(method, ids, index, truncate)

    def _checked_ids(self, method: str, ids: list[int], index: int, truncate) -> list[int]:
        if not ids:
            raise ValueError(f"LLM.{method}(): prompt {index} is empty")
        vocab = self.llm_engine.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"LLM.{method}(): prompt {index}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
            )
        max_len = self.config.max_model_len
        if truncate is not None:
            ids = ids[-(max_len if truncate == -1 else truncate) :]
        if len(ids) > max_len:
            raise ValueError(
                f"LLM.{method}(): prompt {index} has {len(ids)} tokens, more than max_model_len={max_len}; "
                "pass truncate_prompt_tokens or a larger max_model_len"
            )
        return ids

    def _params_list(self, method: str, pooling_params, n: int) -> list[PoolingParams]:
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            return [pooling_params or PoolingParams()] * n
        params = list(pooling_params)
        if len(params) != n:
            raise ValueError(
                f"LLM.{method}(): got {len(params)} pooling_params for {n} prompts; "
                "pass one, or one per prompt"
            )
        return params

    def _pool(
        self, method, prompts, pooling_params, task, truncate, use_tqdm, lora_request, tokenization_kwargs
    ) -> list[PoolingRequestOutput]:
        if lora_request is not None:
            raise NotImplementedError(f"LLM.{method}(): kiln does not implement lora_request")
        prompts = _as_list(prompts)
        if not prompts:
            raise ValueError(f"LLM.{method}(): the list of prompts is empty")
        params_list = self._params_list(method, pooling_params, len(prompts))
        add_special = (tokenization_kwargs or {}).get("add_special_tokens", True)
        prepared = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            params = self._task_params(method, task, params, i)
            trunc = truncate if truncate is not None else params.truncate_prompt_tokens
            prepared.append((*self._token_ids(method, prompt, i, add_special, trunc), params))
        return self._run_pooling(prepared, use_tqdm)

    def _run_pooling(self, prepared, use_tqdm) -> list[PoolingRequestOutput]:
        """Add every prepared ``(text, token ids, task params)`` request, step until all are done."""
        engine, spec = self.llm_engine, self.pooling_spec
        ids = []
        for text, token_ids, params in prepared:
            pooling = "ALL" if params.task in _TOKEN_TASKS else spec.seq_pooling_type
            state = PoolingState(params.task, pooling, params.dimensions, params.use_activation)
            request_id = str(self._request_counter)
            self._request_counter += 1
            engine.add_pooling_request(request_id, text, token_ids, state)
            ids.append(request_id)
        results: dict[str, PoolingRequestOutput] = {}
        bar = None
        if use_tqdm:
            make_bar = use_tqdm if callable(use_tqdm) else tqdm
            bar = make_bar(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        in_tokens, start = 0, time.perf_counter()
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    results[output.request_id] = output
                    if bar is not None:
                        in_tokens += len(output.prompt_token_ids)
                        bar.postfix = (
                            f"est. speed input: {in_tokens / (time.perf_counter() - start):.2f} toks/s"
                        )
                        bar.update(1)
        except BaseException:
            engine.abort_all()
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]

    # ------------------------------------------------------------------ scoring

    def _embedding_score(self, firsts, seconds, params, truncate, use_tqdm, tokenization_kwargs):
        """Cosine similarity of the two sides' embeddings; each distinct text is embedded once."""
        unique: dict[Any, int] = {}
        items = []
        for item in firsts + seconds:
            key = _item_key(item)
            if key not in unique:
                unique[key] = len(items)
                items.append(item)
        outputs = self._pool("score", items, params, "embed", truncate, use_tqdm, None, tokenization_kwargs)
        results = []
        for a, b in zip(firsts, seconds):
            oa, ob = outputs[unique[_item_key(a)]], outputs[unique[_item_key(b)]]
            score = torch.nn.functional.cosine_similarity(oa.outputs.data, ob.outputs.data, dim=0)
            results.append(
                ScoringRequestOutput.from_base(
                    PoolingRequestOutput(
                        f"{oa.request_id}_{ob.request_id}",
                        PoolingOutput(score.reshape(1)),
                        oa.prompt_token_ids + ob.prompt_token_ids,
                        oa.num_cached_tokens + ob.num_cached_tokens,
                        True,
                    )
                )
            )
        return results

    def _cross_encoder_score(self, firsts, seconds, params, truncate, use_tqdm, tokenization_kwargs):
        """The one-label classifier on each pair, tokenized as a text pair (first text first, so a
        shared query is a shared prefix the cache serves)."""
        if self.tokenizer is None:
            raise ValueError("LLM.score(): a cross-encoder needs a tokenizer (skip_tokenizer_init=True)")
        kwargs = dict(tokenization_kwargs or {})
        kwargs.setdefault("add_special_tokens", True)
        params = self._task_params("score", "score", params or PoolingParams(), 0)
        trunc = truncate if truncate is not None else params.truncate_prompt_tokens
        prepared = []
        for i, (a, b) in enumerate(zip(firsts, seconds)):
            if not isinstance(a, str) or not isinstance(b, str):
                raise ValueError(f"LLM.score(): pair {i}: a cross-encoder scores text pairs (str, str)")
            ids = self.tokenizer(a, text_pair=b, **kwargs)["input_ids"]
            prepared.append((None, self._checked_ids("score", ids, i, trunc), params))
        outputs = self._run_pooling(prepared, use_tqdm)
        return [ScoringRequestOutput.from_base(o) for o in outputs]


def _as_list(prompts: Any) -> list:
    if isinstance(prompts, (str, dict)) or (
        isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
    ):
        return [prompts]
    return list(prompts)


def _item_key(item: Any):
    if isinstance(item, dict):
        return repr(sorted(item.items()))
    if isinstance(item, list):
        return ("ids", tuple(item))
    return item
