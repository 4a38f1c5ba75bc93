"""The AVIGATE retrieval model: encoders, audio resampler, (text-guided) gated fusion, scoring
and the training forward (DESIGN §1-§7, §10, §11).

Public API:
- ``encode_text(ids, mask) -> TextFeatures`` and ``encode_video(frames, frame_mask, audio)
  -> VideoFeatures``: independent of each other, cacheable (``cat``, ``to``, ``detach``).
- ``score(text_feats, video_feats) -> [Nt, Nv]``: the same call for every model. A
  text-agnostic model scores by matrix products over the cached video index; a text-guided
  model fuses every (text, video) pair under that pair's own text, in memory-bounded
  chunks, reusing the per-video and per-text parts (FusionTransformer.prepare_*). No
  score depends on which other texts or videos are scored with it.
- ``forward(...) -> TrainOutput``: the in-batch adaptive-margin loss whose logits for a pair
  equal ``score`` for that pair.

Shapes: B batch (Bl local, Bg gathered over ranks), F frames, Q audio queries, A audio
tokens, W_a AST width, D joint width, L layers, Nt / Nv texts / videos, P pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from modules.ast import AST, ASTConfig, audioset_checkpoint_to_ast, load_strict
from modules.clip import CLIP, CLIPConfig, state_dict_problems
from modules.fusion import FusionConfig, FusionTransformer, TextContext, VideoContext
from modules.layers import NEW_WEIGHT_STD, SELF_ATTENTION_PARAM_PREFIXES, copy_clip_layer
from modules.loss import (LossConfig, adaptive_margins, all_gather_no_grad, all_gather_with_grad,
                          margin_contrastive_loss)
from modules.resampler import AudioResampler, ResamplerConfig
from modules.similarity import global_local_scores, index_scores, pair_scores, unit_frames, video_index

TRAINING_PAIRS = ("all", "hardest_k", "own_caption")
PROTOCOLS = ("pairs", "paired_block")
DEFAULT_PAIR_MEMORY_BYTES = 1 << 30
# Working-set estimate of the pair fusion, in values per (pair, frame, width unit): the block
# input and output, the normalized copies and attention outputs (~8) plus the two FFN hidden
# tensors (2 * mlp_ratio). With autograd every layer keeps about 1.5 times that.
FUSION_VALUES_PER_FRAME = 8
TRAINING_SAVED_FACTOR = 1.5


@dataclass
class AVIGATEConfig:
    """Whole-model settings; each builder receives only its own part.

    Args:
        clip: CLIP towers (embed_dim = D).
        ast: AST trunk.
        resampler: audio resampler (width D).
        fusion: fusion transformer (width D; text flags make the model text-guided).
        loss: adaptive margins.
        temperature: tau of the local (log-sum-exp) similarity (``--temperature``).
        training_pairs: which (text, video) pairs a text-guided model fuses in training:
            "all" (every in-batch pair, the rule of DESIGN §4), "hardest_k" (the positive and
            the ``hardest_k`` hardest negatives of each text by the text-agnostic score; the
            other entries are excluded) or "own_caption" (DIAGNOSTIC, leaks: every video is
            fused only with its own caption, as the public implementation trains).
        hardest_k: negatives per text for "hardest_k".
        eval_text_chunk, eval_video_chunk: texts / videos per scoring chunk; None = derived
            from ``pair_memory_bytes``.
        pair_memory_bytes: memory budget of one chunk of pair fusion (eval and training).
        grad_checkpointing: recompute CLIP blocks and the per-pair fusion chunks in backward.
    """

    clip: CLIPConfig = field(default_factory=CLIPConfig)
    ast: ASTConfig = field(default_factory=ASTConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    temperature: float = 1.0
    training_pairs: str = "all"
    hardest_k: int = 8
    eval_text_chunk: Optional[int] = None
    eval_video_chunk: Optional[int] = None
    pair_memory_bytes: int = DEFAULT_PAIR_MEMORY_BYTES
    grad_checkpointing: bool = False

    def __post_init__(self):
        widths = {"clip.embed_dim": self.clip.embed_dim, "resampler.width": self.resampler.width,
                  "fusion.width": self.fusion.width}
        if len(set(widths.values())) != 1:
            raise ValueError(f"the joint width must agree everywhere, got {widths}")
        if self.training_pairs not in TRAINING_PAIRS:
            raise ValueError(f"training_pairs must be one of {TRAINING_PAIRS}, got {self.training_pairs!r}")
        if self.hardest_k < 1:
            raise ValueError(f"hardest_k must be >= 1, got {self.hardest_k}")

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

    frames [B, F, D] CLIP frame embeddings (zeros at padded frames); frame_mask [B, F] bool;
    audio [B, Q, D] resampled audio (None for the visual-only model); text-agnostic models
    also carry index [B, 1+F, D] (unit global vector + unit fused frames, see
    similarity.video_index) and gates name -> [B, L].
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
    """scores [Nt, Nv]; gates name -> [Nv, L] (text-agnostic) or [Nt, Nv, L] (text-guided)."""

    scores: torch.Tensor
    gates: dict[str, torch.Tensor]


@dataclass
class TrainOutput:
    """loss (scalar); logits [Bg, Bg] = scores before the margins (-inf = pair excluded);
    gate_stats name -> [L] mean |g| over the fused videos / pairs."""

    loss: torch.Tensor
    logits: torch.Tensor
    gate_stats: dict[str, torch.Tensor]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _grid(num_texts: int, num_videos: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs of a [num_texts, num_videos] block, text-major: (text_index [P], video_index [P])."""
    ti = torch.arange(num_texts, device=device).repeat_interleave(num_videos)
    vi = torch.arange(num_videos, device=device).repeat(num_texts)
    return ti, vi


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
        self.clip.set_grad_checkpointing(cfg.grad_checkpointing)
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

    # ----- building from released weights ----------------------------------------------
    @classmethod
    def from_pretrained(cls, cfg: AVIGATEConfig, clip_state_dict: dict[str, torch.Tensor],
                        ast_state_dict: Optional[dict] = None) -> "AVIGATE":
        """Build the model with CLIP (and optionally AST) weights and the DESIGN §7 init.

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
        position embeddings take CLIP's text positional embedding [0:F] (DESIGN §7)."""
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

        Padding columns are dropped; a text longer than CLIP's context keeps its first
        context-1 tokens and its end token, as the tokenizer's truncation would.
        """
        if ids.shape != mask.shape:
            raise ValueError(f"text ids {tuple(ids.shape)} and mask {tuple(mask.shape)} differ")
        lengths = mask.long().sum(1).clamp_min(1)
        ids = ids[:, :int(lengths.max())]
        context = self.cfg.clip.context_length
        too_long = lengths > context
        if too_long.any():
            end = ids[torch.arange(ids.shape[0], device=ids.device), lengths - 1]
            ids = ids[:, :context].clone()
            ids[too_long, context - 1] = end[too_long]
        return TextFeatures(self.clip.encode_text(ids))

    def frame_embeddings(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """frames [B, F, 3, H, W], frame_mask [B, F] -> [B, F, D]; CLIP runs on real frames only."""
        if frames.dim() != 5 or tuple(frames.shape[:2]) != tuple(frame_mask.shape):
            raise ValueError(f"frames {tuple(frames.shape)} must be [B, F, 3, H, W] matching "
                             f"frame_mask {tuple(frame_mask.shape)}")
        valid = frame_mask.bool()
        out = frames.new_zeros(*valid.shape, self.cfg.clip.embed_dim)
        if valid.any():
            emb = self.clip.encode_image(frames[valid])
            out = out.to(emb.dtype).index_put((valid,), emb)
        return out

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
                     audio: Optional[torch.Tensor] = None) -> VideoFeatures:
        """Text-independent video features (cacheable).

        Args:
            frames: CLIP-normalized frames [B, F, 3, H, W]; frame_mask [B, F] (1 = real frame).
            audio: fbank [B, 1024, 128] or cached AST tokens [B, A, W_a]; None without audio.
        """
        emb = self.frame_embeddings(frames, frame_mask)
        mask = frame_mask.bool()
        audio_q = self.resampled_audio(audio)
        if self.text_guided:
            return VideoFeatures(emb, mask, audio_q)
        fused = self.fusion(emb, mask, audio_q)
        return VideoFeatures(emb, mask, audio_q, video_index(fused.fused, mask), fused.gates)

    # ----- scoring ----------------------------------------------------------------------
    @torch.no_grad()
    def score(self, text_feats: TextFeatures, video_feats: VideoFeatures,
              chunk: Optional[tuple[int, int]] = None, protocol: str = "pairs",
              block_size: Optional[int] = None) -> torch.Tensor:
        """Scores [Nt, Nv] (see ``score_with_gates``)."""
        return self.score_with_gates(text_feats, video_feats, chunk, protocol, block_size).scores

    @torch.no_grad()
    def score_with_gates(self, text_feats: TextFeatures, video_feats: VideoFeatures,
                         chunk: Optional[tuple[int, int]] = None, protocol: str = "pairs",
                         block_size: Optional[int] = None) -> ScoreOutput:
        """Score every text against every video, with the gate values used.

        Args:
            text_feats: TextFeatures of Nt texts; video_feats: VideoFeatures of Nv videos (any
                device / float dtype; moved chunk by chunk to the model's device).
            chunk: (texts, videos) per chunk of pair fusion (text-guided) or (unused, videos)
                per product (text-agnostic); None = cfg.eval_*_chunk or the memory budget.
            protocol: "pairs" (default): every pair fused under its own text; scores depend
                only on the pair. "paired_block": DIAGNOSTIC that reproduces the public
                implementation's LEAK: texts and videos are cut in blocks of ``block_size`` in
                the given order and, within (text block a, video block c), the k-th video is
                fused with the k-th text of block a (k modulo the block's length), so on the
                diagonal blocks a video is fused with its own caption. Order-dependent; never
                use it to report results. Text-agnostic models score as "pairs" (no text
                enters their fusion, so there is nothing to leak).
            block_size: block length for "paired_block".
        Returns: ScoreOutput(scores [Nt, Nv] fp32, gates).
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self._check_features(text_feats, video_feats)
        device = self.logit_scale.device
        text = text_feats.text.to(device=device, dtype=self.logit_scale.dtype)
        if not self.text_guided:
            return self._score_agnostic(text, video_feats, chunk)
        if protocol == "paired_block":
            if not block_size or block_size < 1:
                raise ValueError("protocol='paired_block' needs block_size >= 1")
            return self._score_paired_block(text, video_feats, block_size)
        return self._score_text_guided(text, video_feats, chunk)

    def _check_features(self, text_feats: TextFeatures, video_feats: VideoFeatures) -> None:
        d = self.cfg.clip.embed_dim
        if text_feats.text.dim() != 2 or text_feats.text.shape[-1] != d or video_feats.frames.shape[-1] != d:
            raise ValueError(f"text features {tuple(text_feats.text.shape)} and video frames "
                             f"{tuple(video_feats.frames.shape)} must both have width D={d}")
        if self.text_guided and video_feats.audio is None:
            raise ValueError("text-guided scoring needs the resampled audio in VideoFeatures")
        if not self.text_guided and video_feats.index is None:
            raise ValueError("text-agnostic scoring needs VideoFeatures.index (made by encode_video)")

    def _pair_bytes(self, training: bool) -> int:
        """Estimated working memory of fusing one pair (see FUSION_VALUES_PER_FRAME)."""
        f, q = self.cfg.fusion, self.cfg.resampler
        per_layer = f.max_frames * f.width * (FUSION_VALUES_PER_FRAME + 2 * f.mlp_ratio) + 2 * q.num_queries * f.width
        if training and not self.cfg.grad_checkpointing:
            per_layer *= TRAINING_SAVED_FACTOR * max(f.layers, 1)
        return int(per_layer * self.logit_scale.element_size())

    def pair_chunks(self, num_texts: int, num_videos: int,
                    chunk: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        """(texts, videos) per chunk: explicit, from the config, or from the memory budget."""
        if chunk is not None:
            return max(1, chunk[0]), max(1, chunk[1])
        pairs = max(1, self.cfg.pair_memory_bytes // self._pair_bytes(training=False))
        nt, nv = max(num_texts, 1), max(num_videos, 1)
        videos = self.cfg.eval_video_chunk or min(nv, math.isqrt(pairs) or 1)
        texts = self.cfg.eval_text_chunk or min(nt, max(1, pairs // videos))
        if not self.cfg.eval_video_chunk and texts == nt:
            videos = min(nv, max(1, pairs // texts))  # few texts: wider video chunks
        return texts, videos

    def _score_agnostic(self, text: torch.Tensor, videos: VideoFeatures,
                        chunk: Optional[tuple[int, int]]) -> ScoreOutput:
        rows = videos.index.shape[1]
        bytes_per_video = max(1, text.shape[0] * rows * text.element_size())
        step = chunk[1] if chunk is not None else (self.cfg.eval_video_chunk or
                                                   max(1, self.cfg.pair_memory_bytes // bytes_per_video))
        device = text.device
        out = [index_scores(text, videos.index[s:s + step].to(device), videos.frame_mask[s:s + step].to(device),
                            self.logit_scale, self.cfg.temperature)
               for s in range(0, len(videos), step)]
        scores = torch.cat(out, dim=1) if out else text.new_zeros(text.shape[0], 0)
        return ScoreOutput(scores, {k: v.float() for k, v in videos.gates.items()})

    def _video_context(self, videos: VideoFeatures, start: int, stop: int) -> VideoContext:
        device, dtype = self.logit_scale.device, self.logit_scale.dtype
        part = videos.select(slice(start, stop)).to(device, dtype)
        return self.fusion.prepare_videos(part.frames, part.frame_mask, part.audio)

    def _fuse_and_score(self, vctx: VideoContext, tctx: TextContext, text: torch.Tensor,
                        ti: torch.Tensor, vi: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pairs (text ti[p], video vi[p]) -> (scores [P], gates name -> [P, L])."""
        out = self.fusion.fuse_pairs(vctx, tctx, ti, vi)
        scores = pair_scores(text[ti], out.fused, vctx.frame_mask[vi], self.logit_scale, self.cfg.temperature)
        return scores, out.gates

    def _score_text_guided(self, text: torch.Tensor, videos: VideoFeatures,
                           chunk: Optional[tuple[int, int]]) -> ScoreOutput:
        nt, nv = text.shape[0], len(videos)
        tc, vc = self.pair_chunks(nt, nv, chunk)
        tctx = self.fusion.prepare_texts(text)
        scores = text.new_zeros(nt, nv)
        gates = {name: text.new_zeros(nt, nv, self.cfg.fusion.layers) for name in self._gate_names()}
        for v0 in range(0, nv, vc):
            v1 = min(v0 + vc, nv)
            vctx = self._video_context(videos, v0, v1)
            for t0 in range(0, nt, tc):
                t1 = min(t0 + tc, nt)
                ti, vi = _grid(t1 - t0, v1 - v0, text.device)
                s, g = self._fuse_and_score(vctx, tctx, text, ti + t0, vi)
                scores[t0:t1, v0:v1] = s.view(t1 - t0, v1 - v0)
                for name, value in g.items():
                    gates[name][t0:t1, v0:v1] = value.view(t1 - t0, v1 - v0, -1)
        return ScoreOutput(scores, gates)

    def _gate_names(self) -> list[str]:
        return list(self.fusion.blocks[0].gates.keys()) if len(self.fusion.blocks) else []

    def _score_paired_block(self, text: torch.Tensor, videos: VideoFeatures, block: int) -> ScoreOutput:
        """The leaking public protocol (see ``score_with_gates``)."""
        nt, nv = text.shape[0], len(videos)
        tctx = self.fusion.prepare_texts(text)
        scores = text.new_zeros(nt, nv)
        gates = {name: text.new_zeros(nt, nv, self.cfg.fusion.layers) for name in self._gate_names()}
        for v0 in range(0, nv, block):
            v1 = min(v0 + block, nv)
            vctx = self._video_context(videos, v0, v1)
            vi = torch.arange(v1 - v0, device=text.device)
            for t0 in range(0, nt, block):
                t1 = min(t0 + block, nt)
                ti = t0 + vi % (t1 - t0)
                out = self.fusion.fuse_pairs(vctx, tctx, ti, vi)
                scores[t0:t1, v0:v1] = global_local_scores(text[t0:t1], out.fused, vctx.frame_mask,
                                                           self.logit_scale, self.cfg.temperature)
                for name, value in out.gates.items():
                    gates[name][t0:t1, v0:v1] = value.unsqueeze(0)
        return ScoreOutput(scores, gates)

    # ----- training -----------------------------------------------------------------------
    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor, frames: torch.Tensor,
                frame_mask: torch.Tensor, audio: Optional[torch.Tensor] = None) -> TrainOutput:
        """In-batch adaptive-margin contrastive loss over the global (all-gathered) batch.

        Args:
            text_ids, text_mask: [Bl, L]; frames [Bl, F, 3, H, W]; frame_mask [Bl, F];
            audio: fbank [Bl, 1024, 128] or AST tokens [Bl, A, W_a] (None without audio).
        Returns: TrainOutput; ``logits[i, j]`` equals ``score`` of text i and video j.
        """
        text = self.encode_text(text_ids, text_mask).text
        emb = self.frame_embeddings(frames, frame_mask)
        mask = frame_mask.bool()
        audio_q = self.resampled_audio(audio)
        text_g = all_gather_with_grad(text)
        mask_g = all_gather_no_grad(mask)
        v0_g = all_gather_no_grad(self.fusion.embed_frames(emb))
        margins = adaptive_margins(text_g, unit_frames(v0_g, mask_g)[1],
                                   self.cfg.loss.beta, self.cfg.loss.margin_cap)
        if not self.text_guided:
            fused = self.fusion(emb, mask, audio_q)
            logits = global_local_scores(text_g, all_gather_with_grad(fused.fused), mask_g,
                                         self.logit_scale, self.cfg.temperature)
            gate_stats = _gate_stats([fused.gates])
        elif self.cfg.training_pairs == "own_caption":
            vctx = self.fusion.prepare_videos(emb, mask, audio_q)
            own = torch.arange(text.shape[0], device=text.device)
            fused = self.fusion.fuse_pairs(vctx, self.fusion.prepare_texts(text), own, own)
            logits = global_local_scores(text_g, all_gather_with_grad(fused.fused), mask_g,
                                         self.logit_scale, self.cfg.temperature)
            gate_stats = _gate_stats([fused.gates])
        else:
            rows, gate_stats = self._pair_rows(text, text_g, emb, mask, audio_q, mask_g, v0_g)
            logits = all_gather_with_grad(rows)
        loss = margin_contrastive_loss(logits, margins, self.logit_scale)
        return TrainOutput(loss, logits, gate_stats)

    def _pair_rows(self, text: torch.Tensor, text_g: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor,
                   audio_q: torch.Tensor, mask_g: torch.Tensor,
                   v0_g: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's logit rows [Bl, Bg]: local texts x all gathered videos, each pair fused
        under its own text (training_pairs "all"), or only the positive and the hardest_k
        negatives (others -inf)."""
        vctx = self.fusion.prepare_videos(all_gather_with_grad(emb), mask_g, all_gather_with_grad(audio_q))
        tctx = self.fusion.prepare_texts(text)
        bl, bg = text.shape[0], mask_g.shape[0]
        if self.cfg.training_pairs == "hardest_k":
            ti, vi = self._hardest_pairs(text, v0_g, mask_g)
        else:
            ti, vi = _grid(bl, bg, text.device)
        step = max(1, self.cfg.pair_memory_bytes // self._pair_bytes(training=True))
        scores, gates = [], []
        for start in range(0, ti.shape[0], step):
            args = (vctx, tctx, text, ti[start:start + step], vi[start:start + step])
            if self.cfg.grad_checkpointing and torch.is_grad_enabled():
                s, g = checkpoint(self._fuse_and_score, *args, use_reentrant=False)
            else:
                s, g = self._fuse_and_score(*args)
            scores.append(s)
            gates.append(g)
        values = torch.cat(scores)
        rows = values.new_full((bl, bg), float("-inf")).index_put((ti, vi), values)
        return rows, _gate_stats(gates)

    @torch.no_grad()
    def _hardest_pairs(self, text: torch.Tensor, v0_g: torch.Tensor,
                       mask_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive + hardest_k negatives of each local text by the text-agnostic score of the
        unfused frames v0 -> (text_index [P], video_index [P])."""
        bl, bg = text.shape[0], v0_g.shape[0]
        cheap = global_local_scores(text, v0_g, mask_g, self.logit_scale, self.cfg.temperature)
        rows = torch.arange(bl, device=text.device)
        positive = _rank() * bl + rows
        cheap[rows, positive] = float("inf")
        k = min(self.cfg.hardest_k + 1, bg)
        vi = cheap.topk(k, dim=1).indices
        return rows.repeat_interleave(k), vi.reshape(-1)


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


def _gate_stats(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Gate values (lists of name -> [N, L]) -> name -> mean |g| per layer [L] (detached)."""
    if not parts or not parts[0]:
        return {}
    return {name: torch.cat([p[name].detach() for p in parts]).abs().mean(0) for name in parts[0]}

