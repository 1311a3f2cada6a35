"""Which activations: the model, the site and the corpus with how it is cut into contexts.

One definition that the sweep spec and the harvest's config compose, so each field's default, check and
description live here once (the harvest adds its split, size, storage and resources; the spec its sweep).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from sae.corpus import CorpusOptions
from sae.lm import site_from_name

LMDType = Literal["float32", "bfloat16", "float16"]


class ActivationSource(CorpusOptions):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    model: str = Field("smollm2-135m", description="a hub name, a local folder, a .gguf file, or an embedded alias")
    revision: str | None = Field(None, description="the hub revision (ignored for local files, identified by "
                                                   "their sha256)")
    site: str = Field("resid_post.15", description="where activations are read: {resid_pre, resid_post, attn_out, "
                                                   "mlp_out}.L")
    corpus: str = Field("wiki-extracts", description="a hub dataset, a local file or folder, or an embedded alias")
    corpus_split: str = Field("train", description="the dataset split read (train and eval are cut from it by "
                                                   "document)")
    text_column: str = Field("text", description="the column holding the text")
    label_column: str | None = Field(None, description="the column of per-document labels the probes predict "
                                                       "(a sweep spec that leaves it out gets its corpus's own: "
                                                       "wiki-extracts has topic)")
    context_length: int = Field(128, ge=2, le=1 << 20, description="tokens per context, BOS included")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of documents held out for evaluation")
    lm_dtype: LMDType | None = Field(None, description="the LM's dtype in the harvest; null: bf16 on a GPU, "
                                                       "fp32 on a CPU")

    @field_validator("site")
    @classmethod
    def _site(cls, v: str) -> str:
        site_from_name(v)  # its error names the site kinds
        return v

    def corpus_options(self) -> CorpusOptions:
        """The library's CorpusOptions for these settings (sae.corpus owns their meaning)."""
        return CorpusOptions(**{name: getattr(self, name) for name in CorpusOptions.model_fields})

    def source_fields(self) -> dict[str, Any]:
        """These settings as keyword arguments, for a model that composes ActivationSource too."""
        return {name: getattr(self, name) for name in ActivationSource.model_fields}
