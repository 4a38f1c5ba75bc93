"""The AVIGATE retrieval model: encoders, audio resampler, (text-guided) gated fusion and its
scores (docs/design.md §1-§5, §10, §11). The training objective lives in ``modules.objective``.

Public API:
- ``encode_text(ids, mask) -> TextFeatures`` and ``encode_video(frames, frame_mask, audio)
  -> VideoFeatures``: independent of each other, cacheable (``cat``, ``to``, ``detach``).
  Every model's VideoFeatures carry the text-agnostic scoring index (for a text-guided model,
  its agnostic view with t := 0, docs/design.md §4a).
- ``score(text_feats, video_feats) -> [Nt, Nv]``: the same call for every model. A
  text-agnostic model scores by matrix products over the cached video index; a text-guided
  model fuses every (text, video) pair under that pair's own text, in memory-bounded
  chunks (``modules.pair_fusion``, sized by ``modules.memory_plan``), reusing the per-video
  and per-text parts. No score depends on which other texts or videos are scored with it.
  ``agnostic_scores`` is stage 1 of shortlist re-ranking.
- Differentiable scorers for the objective: ``similarity`` (text-agnostic, from the index),
  ``pair_context`` + ``score_pairs`` / ``score_grid`` (text-guided pairs).

Scores are always computed in fp32 (``similarity.exact_fp32``), whatever autocast the
encoders and the fusion ran under.

Shapes: B batch, F frames, Q audio queries, A audio tokens, W_a AST width, D joint width,
L layers, Nt / Nv texts / videos, P pairs, Tc / Vc texts / videos of a chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from modules.ast import AST, ASTConfig, audioset_checkpoint_to_ast, load_strict
from modules.clip import CLIP, CLIPConfig, state_dict_problems
from modules.fusion import FusionConfig, FusionTransformer
from modules.layers import NEW_WEIGHT_STD, SELF_ATTENTION_PARAM_PREFIXES, copy_clip_layer
from modules.memory_plan import AGNOSTIC_CHUNK_BYTES, device_memory_bytes, eval_chunk, eval_memory_hint
from modules.pair_fusion import PairContext, PairScores, fuse_pair_chunks, grid_plan
from modules.resampler import AudioResampler, ResamplerConfig
from modules.similarity import (MAX_LOG_LOGIT_SCALE, check_alignment, exact_fp32, exact_fp32_call, index_scores,
                                pair_scores, unit_frames, video_index)


@dataclass
class AVIGATEConfig:
    """Architecture of the model (what a checkpoint's weights mean); training objective and
    runtime settings live elsewhere (``modules.objective.ObjectiveConfig``, call arguments).

    Args:
        clip: CLIP towers (embed_dim = D).
        ast: AST trunk.
        resampler: audio resampler (width D).
        fusion: fusion transformer (width D; text flags make the model text-guided).
        temperature: tau of the local (log-sum-exp) similarity (``--temperature``).
        alignment: the similarity's alignment scheme (``--alignment``): "both" (the mean of
            the global and local terms, docs/design.md §5), "global" or "local" alone (the paper's
            Table 5). It adds no weights; every score of the model (training logits, pair
            scores, the cached index) uses it.
    """

    clip: CLIPConfig = field(default_factory=CLIPConfig)
    ast: ASTConfig = field(default_factory=ASTConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    temperature: float = 1.0
    alignment: str = "both"

    def __post_init__(self):
        check_alignment(self.alignment)
        widths = {"clip.embed_dim": self.clip.embed_dim, "resampler.width": self.resampler.width,
                  "fusion.width": self.fusion.width}
        if len(set(widths.values())) != 1:
            raise ValueError(f"the joint width must agree everywhere, got {widths}")

    @classmethod
    def tiny(cls, **fusion_flags) -> "AVIGATEConfig":
        """A test-sized model (width 64, 2-layer towers, 4 frames, 4 queries); ``fusion_flags``
        go to FusionConfig (e.g. text_gate=True)."""
        clip = CLIPConfig.tiny()
        width = clip.embed_dim
        return cls(clip=clip, ast=ASTConfig.tiny(),
                   resampler=ResamplerConfig(width=width, num_queries=4, layers=2),
                   fusion=FusionConfig(width=width, layers=2, max_frames=4, **fusion_flags))


@dataclass
class TextFeatures:
    """text [N, D]: the text encoder's embeddings (not normalized)."""

    text: torch.Tensor

    def __len__(self) -> int:
        return self.text.shape[0]

    def to(self, *args, **kwargs) -> "TextFeatures":
        return TextFeatures(self.text.to(*args, **kwargs))

    def detach(self) -> "TextFeatures":
        return TextFeatures(self.text.detach())

    def select(self, index: torch.Tensor) -> "TextFeatures":
        return TextFeatures(self.text[index])

    @staticmethod
    def cat(parts: list["TextFeatures"]) -> "TextFeatures":
        return TextFeatures(torch.cat([p.text for p in parts]))


@dataclass
class VideoFeatures:
    """Text-independent video features.

    frames [B, F, D] CLIP frame embeddings (zeros at padded frames under the masked padding
    rule); frame_mask [B, F] bool (real frames); audio [B, Q, D] resampled audio (None for
    the visual-only model); index [B, 1+F, D] the text-agnostic scoring rows (unit global
    vector + unit fused frames, see similarity.video_index; the agnostic view for
    text-guided models; None when not computed) and gates name -> [B, L] of that fusion.
    """

    frames: torch.Tensor
    frame_mask: torch.Tensor
    audio: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    gates: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if tuple(self.frame_mask.shape) != tuple(self.frames.shape[:2]):
            raise ValueError(f"frame_mask {tuple(self.frame_mask.shape)} does not match frames "
                             f"{tuple(self.frames.shape)}")

    def __len__(self) -> int:
        return self.frames.shape[0]

    def _map(self, fn, mask_fn=lambda m: m) -> "VideoFeatures":
        """Apply ``fn`` to every float tensor and ``mask_fn`` to the frame mask."""
        opt = (lambda x: None if x is None else fn(x))
        return VideoFeatures(fn(self.frames), mask_fn(self.frame_mask), opt(self.audio), opt(self.index),
                             {k: fn(v) for k, v in self.gates.items()})

    def to(self, device: Union[str, torch.device, None] = None,
           dtype: Optional[torch.dtype] = None) -> "VideoFeatures":
        """Move (device) and/or cast the float tensors (dtype, e.g. fp16 storage)."""
        return self._map(lambda x: x.to(device=device, dtype=dtype), lambda m: m.to(device=device))

    def detach(self) -> "VideoFeatures":
        return self._map(torch.Tensor.detach)

    def select(self, index: Union[torch.Tensor, slice]) -> "VideoFeatures":
        """Rows ``index`` (a LongTensor or slice) of every tensor."""
        return self._map(lambda x: x[index], lambda m: m[index])

    @staticmethod
    def cat(parts: list["VideoFeatures"]) -> "VideoFeatures":
        """Concatenate batches along B."""
        def cat_opt(xs):
            return None if xs[0] is None else torch.cat(xs)
        first = parts[0]
        return VideoFeatures(torch.cat([p.frames for p in parts]), torch.cat([p.frame_mask for p in parts]),
                             cat_opt([p.audio for p in parts]), cat_opt([p.index for p in parts]),
                             {k: torch.cat([p.gates[k] for p in parts]) for k in first.gates})


@dataclass
class ScoreOutput:
    """scores [Nt, Nv] fp32; gates name -> [Nv, L] (text-agnostic) or [Nt, Nv, L] (text-guided)."""

    scores: torch.Tensor
    gates: dict[str, torch.Tensor]


class AVIGATE(nn.Module):
    """CLIP towers + frozen AST + audio projection + resampler + (text-guided) gated fusion.

    Args:
        cfg: AVIGATEConfig.
    """

    def __init__(self, cfg: AVIGATEConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.clip.embed_dim
        self.clip = CLIP(cfg.clip)
        # The visual-only baseline builds no audio path (no parameters without gradients).
        self.ast = AST(cfg.ast) if cfg.fusion.use_audio else None
        self.audio_projection = nn.Linear(cfg.ast.embed_dim, width, bias=False) if cfg.fusion.use_audio else None
        self.resampler = AudioResampler(cfg.resampler) if cfg.fusion.use_audio else None
        self.fusion = FusionTransformer(cfg.fusion)
        if self.audio_projection is not None:
            nn.init.normal_(self.audio_projection.weight, std=NEW_WEIGHT_STD)

    @property
    def text_guided(self) -> bool:
        return self.cfg.fusion.text_guided

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def text_term_names(self) -> list[str]:
        """Parameters that exist only because the fusion sees the text (docs/design.md §4a): what a
        text-guided model has beyond a text-agnostic one, and all that --freeze_agnostic trains."""
        return self.fusion.text_term_names(prefix="fusion.")

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the CLIP towers' blocks in backward (a runtime memory setting)."""
        self.clip.set_grad_checkpointing(enabled)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep exp(logit_scale) <= 100 by clamping the parameter (after each optimizer step, as
        released; docs/design.md §5)."""
        self.logit_scale.clamp_(max=MAX_LOG_LOGIT_SCALE)

    # ----- building from released weights ----------------------------------------------
    @classmethod
    def from_pretrained(cls, cfg: AVIGATEConfig, clip_state_dict: dict[str, torch.Tensor],
                        ast_state_dict: Optional[dict] = None) -> "AVIGATE":
        """Build the model with CLIP (and optionally AST) weights and the docs/design.md §7 init.

        Args:
            cfg: AVIGATEConfig; ``cfg.clip`` must describe ``clip_state_dict``.
            clip_state_dict: OpenAI CLIP state dict (``modules.clip.load_clip_state_dict``).
            ast_state_dict: the released AudioSet checkpoint's state dict, or None to keep a
                random trunk (tests).
        """
        model = cls(cfg)
        problems = state_dict_problems({k: v.shape for k, v in model.clip.state_dict().items()}, clip_state_dict)
        if problems:
            raise ValueError("clip_state_dict does not fit AVIGATEConfig.clip:\n  " + "\n  ".join(problems))
        model.clip.load_state_dict({k: v.float() for k, v in clip_state_dict.items()}, strict=True)
        if ast_state_dict is not None and model.ast is not None:
            load_strict(model.ast, audioset_checkpoint_to_ast(ast_state_dict))
        model.copy_clip_text_layers()
        return model

    def copy_clip_text_layers(self) -> None:
        """Resampler and fusion blocks l take ln_1/attn/ln_2/mlp of CLIP text block l; the frame
        position embeddings take CLIP's text positional embedding [0:F] (docs/design.md §7)."""
        clip_cfg = self.cfg.clip
        if clip_cfg.transformer_width != clip_cfg.embed_dim:
            raise ValueError(f"CLIP text width {clip_cfg.transformer_width} differs from the joint width "
                             f"{clip_cfg.embed_dim}: its text layers cannot initialize the resampler/fusion")
        source = self.clip.transformer.resblocks
        for name, blocks in (("resampler", self.resampler), ("fusion", self.fusion)):
            count = len(blocks.blocks) if blocks is not None else 0
            if count > len(source):
                raise ValueError(f"{name} has {count} layers but CLIP's text tower only {len(source)}")
            if count and blocks.cfg.heads != clip_cfg.transformer_heads:
                raise ValueError(f"{name}.heads={blocks.cfg.heads} differs from CLIP's text heads "
                                 f"{clip_cfg.transformer_heads}; copied attention weights need the same split")
            for layer in range(count):
                _load_copied_layer(blocks.blocks[layer], copy_clip_layer(source[layer].state_dict()),
                                   f"{name}.blocks.{layer}")
        frames = self.cfg.fusion.max_frames
        if frames > clip_cfg.context_length:
            raise ValueError(f"--max_frames {frames} exceeds CLIP's text positions {clip_cfg.context_length}")
        with torch.no_grad():
            self.fusion.frame_position.copy_(self.clip.positional_embedding[:frames])

    # ----- encoders ---------------------------------------------------------------------
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        """ids [N, L], mask [N, L] (1 = real token, [sot] ... [eot]) -> TextFeatures (t [N, D]).

        A text longer than CLIP's context keeps its first context-1 tokens and its end token,
        as the tokenizer's truncation would. No host synchronization: padding columns stay
        (the causal mask keeps them out of the end token's output).
        """
        if ids.shape != mask.shape:
            raise ValueError(f"text ids {tuple(ids.shape)} and mask {tuple(mask.shape)} differ")
        context = self.cfg.clip.context_length
        if ids.shape[1] > context:
            lengths = mask.long().sum(1).clamp_min(1)
            end = ids.gather(1, (lengths - 1)[:, None])
            ids = ids[:, :context].clone()
            ids.scatter_(1, lengths.clamp(max=context)[:, None] - 1, end)
        return TextFeatures(self.clip.encode_text(ids))

    def frame_embeddings(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """frames [B, F, 3, H, W] (CLIP-normalized), frame_mask [B, F] -> [B, F, D].

        padding_rule "masked": CLIP runs on the real frames only and padded slots are zero.
        "released": CLIP runs on every slot and a padded slot holds its embedding of a blank
        (all-zero, normalized) frame, as the released code's zero-filled video tensor gives.
        """
        if frames.dim() != 5 or tuple(frames.shape[:2]) != tuple(frame_mask.shape):
            raise ValueError(f"frames {tuple(frames.shape)} must be [B, F, 3, H, W] matching "
                             f"frame_mask {tuple(frame_mask.shape)}")
        valid = frame_mask.bool()
        if self.cfg.fusion.padding_rule == "released":
            blank = torch.where(valid[:, :, None, None, None], frames, torch.zeros_like(frames))
            return self.clip.encode_image(blank.flatten(0, 1)).unflatten(0, tuple(valid.shape))
        # Finding the real frames costs one host synchronization (their count sizes CLIP's
        # batch); running CLIP on padded slots instead would cost more compute on short clips
        # (VATEX: 2 of 12 frames). Gathering and scattering by their indices adds none, where a
        # boolean mask would synchronize again in the scatter and in its backward.
        real = valid.flatten().nonzero().squeeze(1)  # [R] flat indices of the real frames
        emb = self.clip.encode_image(frames.flatten(0, 1).index_select(0, real))  # [R, D]
        return emb.new_zeros(valid.numel(), emb.shape[-1]).index_copy(0, real, emb).view(*valid.shape, -1)

    def resampled_audio(self, audio: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """audio: fbank [B, 1024, 128] or cached AST tokens [B, A, W_a] (told apart by shape)
        -> Â [B, Q, D]; None for the visual-only model."""
        if self.ast is None:
            return None
        if audio is None:
            raise ValueError("this model fuses audio: pass the fbank [B, 1024, 128] or the cached "
                             "AST tokens [B, A, W_a] (or build it with --no_audio)")
        ast_cfg = self.cfg.ast
        fbank_shape = (ast_cfg.target_frames, ast_cfg.num_mel_bins)
        token_shape = (ast_cfg.num_output_tokens, ast_cfg.embed_dim)
        if tuple(audio.shape[1:]) == fbank_shape:
            tokens = self.ast.tokens(audio)
        elif tuple(audio.shape[1:]) == token_shape:
            tokens = audio
        else:
            raise ValueError(f"audio {tuple(audio.shape)} is neither an fbank [B, {fbank_shape[0]}, "
                             f"{fbank_shape[1]}] nor AST tokens [B, {token_shape[0]}, {token_shape[1]}]")
        weight = self.audio_projection.weight
        return self.resampler(self.audio_projection(self.ast.norm(tokens.to(weight.dtype))))

    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor,
                     audio: Optional[torch.Tensor] = None, with_index: bool = True) -> VideoFeatures:
        """Text-independent video features (cacheable).

        Args:
            frames: CLIP-normalized frames [B, F, 3, H, W]; frame_mask [B, F] (1 = real frame).
            audio: fbank [B, 1024, 128] or cached AST tokens [B, A, W_a]; None without audio.
            with_index: also fuse text-agnostically (a text-guided model: its t := 0 view) and
                build the scoring index; text-guided training does not need it.
        """
        emb = self.frame_embeddings(frames, frame_mask)
        mask = frame_mask.bool()
        audio_q = self.resampled_audio(audio)
        if not with_index:
            return VideoFeatures(emb, mask, audio_q)
        fused = self.fusion.agnostic(emb, mask, audio_q)
        with exact_fp32(emb.device):
            index = video_index(fused.fused.float(), mask)
        return VideoFeatures(emb, mask, audio_q, index, fused.gates)

    def video_summary(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """docs/design.md §6's v-bar: frames [B, F, D] -> normalize(masked mean of normalized v0) [B, D]."""
        with exact_fp32(frames.device):
            return unit_frames(self.fusion.embed_frames(frames).float(), frame_mask)[1]

    # ----- differentiable scorers ---------------------------------------------------------
    def similarity(self, text: torch.Tensor, index: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Text-agnostic scores [Nt, Nv] of texts [Nt, D] against video index rows [Nv, 1+F, D]
        (VideoFeatures.index) with frame_mask [Nv, F], in fp32."""
        def scores(text_, index_, logit_scale):
            return index_scores(text_, index_, frame_mask, logit_scale, self.cfg.temperature,
                                alignment=self.cfg.alignment)

        return exact_fp32_call(scores, text.float(), index.float(), self.logit_scale.float())

    def unfused_scores(self, text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Scores [Nt, Nv] of texts [Nt, D] against the unfused frames v0 [Nv, F, D] (a cheap
        ranking, e.g. for choosing hard negatives), in fp32."""
        with exact_fp32(text.device):
            rows = video_index(self.fusion.embed_frames(frames).float(), frame_mask)
        return self.similarity(text, rows, frame_mask)

    def pair_context(self, text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor,
                     audio: torch.Tensor) -> PairContext:
        """Prepare pair scoring of texts [Nt, D] against videos (frames [Nv, F, D], frame_mask
        [Nv, F], resampled audio [Nv, Q, D]): per-text and per-video parts, once."""
        if not self.text_guided:
            raise ValueError("pair scoring is for text-guided models; a text-agnostic model scores "
                             "with similarity() over VideoFeatures.index")
        mask = frame_mask.bool()
        return PairContext(text.float(), self.fusion.prepare_texts(text),
                           self.fusion.prepare_videos(frames, mask, audio), mask)

    def _pair_similarity(self, ctx: PairContext, ti: torch.Tensor, vi: torch.Tensor,
                         fused: torch.Tensor) -> torch.Tensor:
        """fp32 scores [P] of pairs (text ti[p], video vi[p]) with fused frames [P, F, D]."""
        mask = ctx.frame_mask[vi]

        def scores(text, frames, logit_scale):
            return pair_scores(text, frames, mask, logit_scale, self.cfg.temperature, self.cfg.alignment)

        return exact_fp32_call(scores, ctx.text[ti], fused.float(), self.logit_scale.float())

    def score_pairs(self, ctx: PairContext, ti: torch.Tensor, vi: torch.Tensor) -> PairScores:
        """Differentiable scores of pairs p = (text ti[p], video vi[p]), ti/vi LongTensor [P],
        each fused under its own text -> PairScores(scores [P], gates [P, L])."""
        out = self.fusion.fuse_pairs(ctx.videos, ctx.texts, ti, vi)
        return PairScores(self._pair_similarity(ctx, ti, vi, out.fused), out.gates)

    def score_grid(self, ctx: PairContext, text_rows: torch.Tensor, video_cols: torch.Tensor) -> PairScores:
        """Differentiable scores of every pair of texts text_rows [Tc] x videos video_cols [Vc]
        -> PairScores(scores [Tc, Vc], gates [Tc, Vc, L]); the audio keys stay per video."""
        out = self.fusion.fuse_grid(ctx.videos, ctx.texts, text_rows, video_cols)
        tc, vc = text_rows.shape[0], video_cols.shape[0]
        ti = text_rows.repeat(vc)
        vi = video_cols.repeat_interleave(tc, output_size=tc * vc)
        scores = self._pair_similarity(ctx, ti, vi, out.fused).view(vc, tc).t()
        gates = {name: g.view(vc, tc, -1).transpose(0, 1) for name, g in out.gates.items()}
        return PairScores(scores, gates)

    # ----- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def score(self, text_feats: TextFeatures, video_feats: VideoFeatures,
              chunk: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Scores [Nt, Nv] (see ``score_with_gates``)."""
        return self.score_with_gates(text_feats, video_feats, chunk).scores

    @torch.no_grad()
    def score_with_gates(self, text_feats: TextFeatures, video_feats: VideoFeatures,
                         chunk: Optional[tuple[int, int]] = None) -> ScoreOutput:
        """Score every text against every video, with the gate values used. Each score depends
        only on its (text, video) pair.

        Args:
            text_feats: TextFeatures of Nt texts; video_feats: VideoFeatures of Nv videos (any
                device / float dtype; moved chunk by chunk to the model's device).
            chunk: (texts, videos) per chunk of pair fusion (text-guided) or (unused, videos)
                per product (text-agnostic); None = memory_plan.DEFAULT_EVAL_PAIRS_PER_CHUNK pairs.
        Returns: ScoreOutput(scores [Nt, Nv] fp32, gates).
        """
        self._check_features(text_feats, video_feats)
        text = text_feats.text.to(self.logit_scale.device)
        if not self.text_guided:
            return self._score_agnostic(text, video_feats, chunk)
        return self._score_text_guided(text, video_feats, chunk)

    @torch.no_grad()
    def agnostic_scores(self, text_feats: TextFeatures, video_feats: VideoFeatures,
                        chunk: Optional[tuple[int, int]] = None) -> ScoreOutput:
        """Scores [Nt, Nv] of the text-agnostic view (docs/design.md §4a; for a text-agnostic model its
        scores) from the cached index: stage 1 of shortlist re-ranking."""
        if video_feats.index is None:
            raise ValueError("agnostic scores need VideoFeatures.index (encode_video(..., with_index=True))")
        return self._score_agnostic(text_feats.text.to(self.logit_scale.device), video_feats, chunk)

    def _check_features(self, text_feats: TextFeatures, video_feats: VideoFeatures) -> None:
        d = self.cfg.clip.embed_dim
        if text_feats.text.dim() != 2 or text_feats.text.shape[-1] != d or video_feats.frames.shape[-1] != d:
            raise ValueError(f"text features {tuple(text_feats.text.shape)} and video frames "
                             f"{tuple(video_feats.frames.shape)} must both have width D={d}")
        if self.text_guided and video_feats.audio is None:
            raise ValueError("text-guided scoring needs the resampled audio in VideoFeatures")
        if not self.text_guided and video_feats.index is None:
            raise ValueError("text-agnostic scoring needs VideoFeatures.index (made by encode_video)")

    def pair_chunks(self, num_texts: int, num_videos: int,
                    chunk: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        """(texts, videos) per chunk of pair fusion when scoring (``memory_plan.eval_chunk``)."""
        return eval_chunk(num_texts, num_videos, chunk)

    def eval_memory_hint(self, num_texts: int, num_videos: int, chunk: Optional[tuple[int, int]] = None,
                         precision: str = "fp32") -> str:
        """What bounds the memory of scoring and an ``--eval_chunk`` to try (a quarter of the
        model's GPU at most), for out-of-memory messages."""
        if not self.text_guided:
            return ("text-agnostic scoring is matrix products over the cached index; lower --batch_size_val "
                    "(encoding) or evaluate on more GPUs")
        return eval_memory_hint(self.cfg.fusion, num_texts, num_videos, chunk, precision,
                                device_memory_bytes(self.logit_scale.device))

    def _score_agnostic(self, text: torch.Tensor, videos: VideoFeatures,
                        chunk: Optional[tuple[int, int]]) -> ScoreOutput:
        rows = videos.index.shape[1]
        bytes_per_video = max(1, text.shape[0] * rows * 4)
        step = chunk[1] if chunk is not None else max(1, AGNOSTIC_CHUNK_BYTES // bytes_per_video)
        device = text.device
        out = [self.similarity(text, videos.index[s:s + step].to(device), videos.frame_mask[s:s + step].to(device))
               for s in range(0, len(videos), step)]
        scores = torch.cat(out, dim=1) if out else text.new_zeros(text.shape[0], 0, dtype=torch.float32)
        return ScoreOutput(scores, {k: v.float() for k, v in videos.gates.items()})

    def video_context_inputs(self, videos: VideoFeatures, start: int, stop: int) -> VideoFeatures:
        """Videos [start, stop) on the model's device in its parameter dtype."""
        return videos.select(slice(start, stop)).to(self.logit_scale.device, self.logit_scale.dtype)

    def _score_text_guided(self, text: torch.Tensor, videos: VideoFeatures,
                           chunk: Optional[tuple[int, int]]) -> ScoreOutput:
        nt, nv = text.shape[0], len(videos)
        plan = grid_plan(nt, nv, self.pair_chunks(nt, nv, chunk), text.device)
        out = fuse_pair_chunks(self, text, plan, videos=videos)
        return ScoreOutput(out.scores, {name: g.float() for name, g in out.gates.items()})

    def gate_names(self) -> list[str]:
        """Names of the gates a pair's fusion reports ("att", "ff", "q")."""
        return list(self.fusion.blocks[0].gates.keys()) if len(self.fusion.blocks) else []


def _load_copied_layer(block: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Strict load of the copied CLIP keys: every ln_1/attn/ln_2/mlp entry of ``block`` must
    come from ``weights`` and nothing else may be in it."""
    expected = {k for k in block.state_dict() if k.startswith(SELF_ATTENTION_PARAM_PREFIXES)}
    if set(weights) != expected:
        raise ValueError(f"{where}: copied CLIP layer keys differ: missing {sorted(expected - set(weights))}, "
                         f"unexpected {sorted(set(weights) - expected)}")
    result = block.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{where}: unexpected keys {result.unexpected_keys}")
