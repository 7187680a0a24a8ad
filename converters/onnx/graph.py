"""The DeepSeek decoder (MLA over a latent cache + routed MoE) as an ONNX graph for onnxruntime.

Inputs: input_ids, position_ids [B, S] and attention_mask [B, P + S] (int64), per layer
past_latent.{i} [B, 1, P, kv_lora + rope] (float32), and logits_to_keep (int64 [1]: the head
runs on the last that many positions, all when 0). Outputs: logits [B, S', V] (S' = logits_to_keep or S) and per
layer present_latent.{i} [B, 1, P + S, kv_lora + rope].

Ops: MatMulNBits for every 2-D projection and the head, GatherBlockQuantized for the token
embedding (the same blocks, dequantized a gathered row at a time), QMoE for the routed experts,
RMSNormalization, RotaryEmbedding (interleaved), and MLA in the absorbed form (W_UK folded
into the query, W_UV applied after attention) straight over the latent rows.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto

from edge_ds.config import ModelConfig
from edge_ds.layout import kv_b_name, split_kv_b
from edge_ds.models.rope import rope_inv_freq

from .builder import MS, GraphBuilder
from .quant import BlockQuant, quantize_blocks

Read = Callable[[str], np.ndarray]  # checkpoint tensor name -> float32 array
FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
MASKED = -1e9  # finite, so fully masked rows (left padding) stay finite instead of NaN


def io_names(cfg: ModelConfig) -> dict:
    """Names and shapes of the graph's inputs and outputs (also written to onnx.json)."""
    L, D = cfg.num_hidden_layers, cfg.latent_dim
    return {
        "inputs": {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "total_seq"],
                   "position_ids": ["batch", "seq"], "logits_to_keep": [1],
                   **{f"past_latent.{i}": ["batch", 1, "past_seq", D] for i in range(L)}},
        "outputs": {"logits": ["batch", "kept_seq", cfg.vocab_size],
                    **{f"present_latent.{i}": ["batch", 1, "total_seq", D] for i in range(L)}},
    }


class DecoderGraph:
    def __init__(self, cfg: ModelConfig, read: Read, quant: BlockQuant):
        self.cfg, self.read, self.quant = cfg, read, quant
        self.g = GraphBuilder(f"edge-ds {cfg.model_type}")

    # --- building blocks ----------------------------------------------------------------
    def linear(self, x: str, w: np.ndarray, hint: str) -> str:
        """x [..., K] @ w[N, K]^T through MatMulNBits."""
        n, k = w.shape
        packed, scales = quantize_blocks(w, self.quant)
        g = self.g
        return g.op("MatMulNBits", [x, g.const(packed, hint + ".qweight"), g.const(scales, hint + ".scales")],
                    hint, domain=MS, K=k, N=n, bits=self.quant.bits, block_size=self.quant.block_size,
                    accuracy_level=self.quant.accuracy_level)

    def embedding(self, name: str) -> str:
        """input_ids -> rows [B, S, hidden] of the table `name`, stored in the projections' blocks
        (GatherBlockQuantized dequantizes only the rows it gathers); hidden is padded to whole
        blocks in the table and the padding sliced off."""
        g, D = self.g, self.cfg.hidden_size
        packed, scales = quantize_blocks(self.read(name), self.quant)  # [V, blocks, bs * bits / 8], [V, blocks]
        rows = g.op("GatherBlockQuantized", [g.const(packed.reshape(packed.shape[0], -1), name + ".qweight"),
                                             "input_ids", g.const(scales, name + ".scales")], "embed", domain=MS,
                    gather_axis=0, quantize_axis=1, block_size=self.quant.block_size, bits=self.quant.bits)
        padded = scales.shape[1] * self.quant.block_size
        return rows if padded == D else g.op("Slice", [rows, g.ints(0), g.ints(D), g.ints(-1)], "embed_unpad")

    def rms_norm(self, x: str, name: str, eps: float) -> str:
        return self.g.op("RMSNormalization", [x, self.g.const(self.read(name), name)], name.removesuffix(".weight"),
                         axis=-1, epsilon=eps)

    def swiglu_mlp(self, x: str, prefix: str) -> str:
        """down(silu(gate(x)) * up(x)), gate and up in one MatMulNBits."""
        g = self.g
        gate, up = self.read(prefix + ".gate_proj.weight"), self.read(prefix + ".up_proj.weight")
        gu = self.linear(x, np.concatenate([gate, up]), prefix + ".gate_up_proj")
        a, b = g.op("Split", [gu, g.ints(gate.shape[0], up.shape[0])], prefix + ".split", outputs=2, axis=-1)
        h = g.op("Mul", [g.op("Mul", [a, g.op("Sigmoid", [a])]), b])
        return self.linear(h, self.read(prefix + ".down_proj.weight"), prefix + ".down_proj")

    def rope_rows_scaled(self, w: np.ndarray) -> np.ndarray:
        """The query projection w [H * (nope + rope), K] (q_proj or q_b_proj) with its rope rows scaled by
        softmax_scale (rotation is linear, so the scores' scale can be applied before it)."""
        cfg = self.cfg
        H, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        heads = w.reshape(H, nope + rope, -1).copy()
        heads[:, nope:] *= np.float32(cfg.softmax_scale)
        return heads.reshape(w.shape)

    def rope(self, x: str) -> str:
        """Interleaved rotation of x [B, heads, S, rope] at position_ids."""
        return self.g.op("RotaryEmbedding", [x, self.cos, self.sin, "position_ids"], "rope", interleaved=1)

    # --- the model ----------------------------------------------------------------------
    def build(self) -> GraphBuilder:
        cfg, g = self.cfg, self.g
        D = cfg.latent_dim
        g.input("input_ids", INT64, ["batch", "seq"])
        g.input("attention_mask", INT64, ["batch", "total_seq"])
        g.input("position_ids", INT64, ["batch", "seq"])
        pasts = [g.input(f"past_latent.{i}", FLOAT, ["batch", 1, "past_seq", D]) for i in range(cfg.num_hidden_layers)]
        keep = g.input("logits_to_keep", INT64, [1])  # 0: every position

        inv_freq, attention_factor = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling,
                                                   cfg.max_position_embeddings)
        angles = np.arange(cfg.max_position_embeddings, dtype=np.float32)[:, None] * inv_freq[None]
        # transformers scales cos and sin by YaRN's attention factor; so do we.
        self.cos = g.const((np.cos(angles) * attention_factor).astype(np.float32), "rope.cos")
        self.sin = g.const((np.sin(angles) * attention_factor).astype(np.float32), "rope.sin")

        x = self.embedding("model.embed_tokens.weight")
        mask = self.attention_bias(pasts[0])
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            h = self.rms_norm(x, f"{p}.input_layernorm.weight", cfg.rms_norm_eps)
            attn, present = self.mla(h, pasts[i], mask, p + ".self_attn")
            g.output(present, f"present_latent.{i}", FLOAT, ["batch", 1, "total_seq", D])
            x = g.op("Add", [x, attn], f"{p}.residual1")
            h = self.rms_norm(x, f"{p}.post_attention_layernorm.weight", cfg.rms_norm_eps)
            ffn = self.moe(h, p + ".mlp") if cfg.is_moe_layer(i) else self.swiglu_mlp(h, p + ".mlp")
            x = g.op("Add", [x, ffn], f"{p}.residual2")

        # Only the last `logits_to_keep` positions go through the head (all when 0).
        start = g.op("Neg", [keep])
        x = g.op("Slice", [x, start, g.ints(np.iinfo(np.int64).max), g.ints(1)], "keep_positions")
        x = self.rms_norm(x, "model.norm.weight", cfg.rms_norm_eps)
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        logits = self.linear(x, self.read(head), "lm_head")
        g.output(logits, "logits", FLOAT, ["batch", "kept_seq", cfg.vocab_size])
        return g

    def attention_bias(self, past: str) -> str:
        """Additive mask [B, 1, S, T]: 0 where query s (at absolute index P + s) may see key t
        (t <= P + s and attention_mask[b, t] = 1), MASKED elsewhere."""
        g = self.g
        past_len = g.op("Slice", [g.op("Shape", [past]), g.ints(2), g.ints(3)], "past_len")
        seq = g.op("Slice", [g.op("Shape", ["input_ids"]), g.ints(1), g.ints(2)], "seq_len")
        total = g.op("Slice", [g.op("Shape", ["attention_mask"]), g.ints(1), g.ints(2)], "total_len")
        zero, one = g.const(np.array(0, np.int64), "zero"), g.const(np.array(1, np.int64), "one")
        squeeze = lambda v: g.op("Squeeze", [v, g.ints(0)])  # noqa: E731
        q_pos = g.op("Range", [squeeze(past_len), squeeze(g.op("Add", [past_len, seq])), one], "q_pos")
        k_pos = g.op("Range", [zero, squeeze(total), one], "k_pos")
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.ints(0)]), g.op("Unsqueeze", [q_pos, g.ints(1)])])
        padded = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.ints(1, 2)])], to=TensorProto.BOOL)
        allowed = g.op("And", [causal, padded], "allowed")  # [B, 1, S, T]
        return g.op("Where", [allowed, g.scalar(0.0), g.scalar(MASKED)], "attention_bias")

    def mla(self, h: str, past: str, mask: str, p: str) -> tuple[str, str]:
        """h [B, S, hidden] -> (output [B, S, hidden], present latent [B, 1, P + S, kv_lora + rope])."""
        cfg, g = self.cfg, self.g
        H, nope, rope, v, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                               cfg.v_head_dim, cfg.kv_lora_rank)
        kv_a = self.read(p + ".kv_a_proj_with_mqa.weight")
        # The query's first projection and kv_a read the same input: one MatMulNBits for both.
        q_first = (self.rope_rows_scaled(self.read(p + ".q_proj.weight")) if cfg.q_lora_rank is None
                   else self.read(p + ".q_a_proj.weight"))
        both = self.linear(h, np.concatenate([q_first, kv_a]), p + ".q_kv_a_proj")
        q, kv = g.op("Split", [both, g.ints(q_first.shape[0], kv_a.shape[0])], p + ".split_q_kv", outputs=2, axis=-1)
        if cfg.q_lora_rank is not None:
            q = self.rms_norm(q, p + ".q_a_layernorm.weight", 1e-6)  # transformers' default eps, not rms_norm_eps
            q = self.linear(q, self.rope_rows_scaled(self.read(p + ".q_b_proj.weight")), p + ".q_b_proj")
        q = g.op("Transpose", [g.op("Reshape", [q, g.ints(0, 0, H, nope + rope)])], perm=[0, 2, 1, 3])
        q_nope, q_pe = g.op("Split", [q, g.ints(nope, rope)], p + ".split_q", outputs=2, axis=-1)  # [B, H, S, *]

        c, k_pe = g.op("Split", [kv, g.ints(r, rope)], p + ".split_kv", outputs=2, axis=-1)
        c = self.rms_norm(c, p + ".kv_a_layernorm.weight", 1e-6)
        k_pe = g.op("RotaryEmbedding", [k_pe, self.cos, self.sin, "position_ids"], "rope", interleaved=1,
                    num_heads=1)  # [B, S, rope]: one head shared by all
        new = g.op("Unsqueeze", [g.op("Concat", [c, k_pe], axis=-1), g.ints(1)], p + ".latent")  # [B, 1, S, r + rope]
        latent = g.op("Concat", [past, new], p + ".present", axis=2)  # [B, 1, T, r + rope]

        w_uk, w_uv = split_kv_b(self.read(kv_b_name(p)), cfg)  # [H, nope, r], [H, v, r]
        w_uk = np.ascontiguousarray(w_uk * np.float32(cfg.softmax_scale))  # scale folded in (q_pe's: in the query's rope rows)
        w_uv = np.ascontiguousarray(w_uv.transpose(0, 2, 1))  # [H, r, v]
        q_lat = g.op("MatMul", [q_nope, g.const(w_uk, p + ".w_uk")], p + ".q_latent")  # [B, H, S, r]
        query = g.op("Concat", [q_lat, self.rope(q_pe)], axis=-1)  # [B, H, S, r + rope]
        # One latent row serves every head (MQA): the heads' queries stack into one [H * S, r + rope]
        # product with the latents, so each step reads the cache once instead of once per head.
        stacked = g.op("Reshape", [query, g.ints(0, 1, -1, r + rope)])  # [B, 1, H * S, r + rope]
        scores = g.op("MatMul", [stacked, g.op("Transpose", [latent], perm=[0, 1, 3, 2])], p + ".scores")
        scores = g.op("Add", [g.op("Reshape", [scores, g.ints(0, H, -1, 0)]), mask])  # [B, H, S, T]
        probs = g.op("Reshape", [g.op("Softmax", [scores], p + ".probs", axis=-1), g.ints(0, 1, -1, 0)])
        # Weighted latent rows, rope columns included (cheaper than slicing the cache), then dropped.
        mixed = g.op("Reshape", [g.op("MatMul", [probs, latent]), g.ints(0, H, -1, r + rope)])  # [B, H, S, r + rope]
        mixed = g.op("Slice", [mixed, g.ints(0), g.ints(r), g.ints(3)], p + ".mixed")  # [B, H, S, r]
        ctx = g.op("MatMul", [mixed, g.const(w_uv, p + ".w_uv")])  # [B, H, S, v]
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.ints(0, 0, H * v)])
        return self.linear(ctx, self.read(p + ".o_proj.weight"), p + ".o_proj"), latent

    def moe(self, h: str, p: str) -> str:
        """Routed experts (QMoE) + shared experts; h [B, S, hidden]."""
        cfg, g = self.cfg, self.g
        E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        router = g.const(np.ascontiguousarray(self.read(p + ".gate.weight").T), p + ".gate.weight_t")
        logits = g.op("MatMul", [h, router], p + ".router_logits")  # [B, S, E]
        logits = g.op("Reshape", [logits, g.ints(-1, E)])  # [N, E]: QMoE takes 2-D router inputs, 3-D tokens
        scores = g.op("Sigmoid" if cfg.scoring_func == "sigmoid" else "Softmax", [logits], p + ".scores",
                      **({} if cfg.scoring_func == "sigmoid" else {"axis": -1}))
        choice = scores
        if cfg.topk_method == "noaux_tc":
            choice = g.op("Add", [scores, g.const(self.read(p + ".gate.e_score_correction_bias"), p + ".bias")])
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            choice = self.group_limit(choice, p)
        fc1, fc1_scales, fc2, fc2_scales = self.expert_weights(p)
        # onnxruntime 1.31's CPU QMoE is exact for blocked 4-bit but not for blocked 8-bit
        # (~1e-2 off at any accuracy level): 8-bit experts get one scale per row instead.
        blocked = {"block_size": self.quant.block_size} if self.quant.bits == 4 else {}
        D, padded = cfg.hidden_size, self.expert_widths()[0]
        x = h if padded == D else g.op("Pad", [h, g.ints(0, 0, 0, 0, 0, padded - D)], p + ".pad_hidden")
        # QMoE picks the top k of softmax(router_probs) (order-preserving, so the top k of the
        # choice scores; masked groups are -inf) and mixes with router_weights at those experts.
        routed = g.op("QMoE", [x, choice, fc1, fc1_scales, "", fc2, fc2_scales, "", "", "", "", "", "", "",
                               scores], p + ".experts", domain=MS,
                      k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                      normalize_routing_weights=int(cfg.norm_topk_prob), expert_weight_bits=self.quant.bits,
                      accuracy_level=self.quant.accuracy_level, **blocked)
        if padded != D:
            routed = g.op("Slice", [routed, g.ints(0), g.ints(D), g.ints(-1)], p + ".unpad_hidden")
        if cfg.n_shared_experts:
            routed = g.op("Add", [routed, self.swiglu_mlp(h, p + ".shared_experts")])
        return routed

    def group_limit(self, choice: str, p: str) -> str:
        """Keeps the topk_group best groups of experts (-inf elsewhere): group score = sum of the
        top two (noaux_tc) or the best (group_limited_greedy) choice score in the group."""
        cfg, g = self.cfg, self.g
        G = cfg.n_group
        grouped = g.op("Reshape", [choice, g.ints(-1, G, cfg.n_routed_experts // G)], p + ".grouped")
        if cfg.topk_method == "noaux_tc":
            top2, _ = g.op("TopK", [grouped, g.ints(2)], p + ".top2", outputs=2, axis=-1)
            group_scores = g.op("ReduceSum", [top2, g.ints(-1)], keepdims=0)
        else:
            group_scores = g.op("ReduceMax", [grouped, g.ints(-1)], keepdims=0)
        best, _ = g.op("TopK", [group_scores, g.ints(cfg.topk_group)], p + ".top_groups", outputs=2, axis=-1)
        # A group is kept when its score reaches the topk_group-th best (ties, measure zero, keep both).
        threshold = g.op("ReduceMin", [best, g.ints(-1)], p + ".group_threshold", keepdims=1)  # [N, 1]
        keep = g.op("GreaterOrEqual", [group_scores, threshold], p + ".kept_groups")  # [N, G]
        masked = g.op("Where", [g.op("Unsqueeze", [keep, g.ints(-1)]), grouped, g.scalar(-np.inf)])
        return g.op("Reshape", [masked, g.ints(-1, cfg.n_routed_experts)], p + ".choice")

    def expert_widths(self) -> tuple[int, int]:
        """(hidden, intermediate) as the experts are stored: blocked 4-bit QMoE needs both to be
        whole blocks, so they are zero-padded up (zero weights add nothing; the padded hidden
        outputs are sliced off)."""
        cfg, bs = self.cfg, self.quant.block_size
        if self.quant.bits != 4:
            return cfg.hidden_size, cfg.moe_intermediate_size
        return -(-cfg.hidden_size // bs) * bs, -(-cfg.moe_intermediate_size // bs) * bs

    def expert_weights(self, p: str) -> tuple[str, str, str, str]:
        """fc1 [E, 2I, K/pack] with gate and up rows interleaved (swiglu_fusion=1), fc2 [E, hidden, I/pack];
        scales [E, N, K/block] (4-bit) or [E, N] (8-bit); hidden and I padded as expert_widths says."""
        cfg, g = self.cfg, self.g
        fc1, fc1_s, fc2, fc2_s = [], [], [], []
        per_row = self.quant.bits == 8  # see moe()
        D, I = self.expert_widths()
        q1 = BlockQuant(8, D, self.quant.accuracy_level) if per_row else self.quant
        q2 = BlockQuant(8, I, self.quant.accuracy_level) if per_row else self.quant
        for e in range(cfg.n_routed_experts):
            gate = self.read(f"{p}.experts.{e}.gate_proj.weight")
            up = self.read(f"{p}.experts.{e}.up_proj.weight")
            inter = np.zeros((2 * I, D), np.float32)
            inter[0:2 * gate.shape[0]:2, : gate.shape[1]], inter[1:2 * gate.shape[0]:2, : gate.shape[1]] = gate, up
            packed, scales = quantize_blocks(inter, q1)
            fc1.append(packed.reshape(packed.shape[0], -1))
            fc1_s.append(scales[:, 0] if per_row else scales)
            down = self.read(f"{p}.experts.{e}.down_proj.weight")
            packed, scales = quantize_blocks(np.pad(down, ((0, D - down.shape[0]), (0, I - down.shape[1]))), q2)
            scales = scales * np.float32(cfg.routed_scaling_factor)  # the experts' output scale, folded in
            fc2.append(packed.reshape(packed.shape[0], -1))
            fc2_s.append(scales[:, 0] if per_row else scales)
        return (g.const(np.stack(fc1), p + ".fc1.qweight"), g.const(np.stack(fc1_s), p + ".fc1.scales"),
                g.const(np.stack(fc2), p + ".fc2.qweight"), g.const(np.stack(fc2_s), p + ".fc2.scales"))


def build_model(cfg: ModelConfig, read: Read, quant: BlockQuant) -> onnx.ModelProto:
    """The ONNX ModelProto for a checkpoint (tensors fetched one at a time through `read`)."""
    return DecoderGraph(cfg, read, quant).build().model(doc=f"edge-ds export of a {cfg.model_type} model")
