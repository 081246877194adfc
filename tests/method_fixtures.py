"""Shared builders for the PEFT-method tests: one adapter per method on the tiny BERT of switchable_fixtures (every
trained tensor moved off its initial value), and eager PEFT's embeddings with it (the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from switchable_fixtures import ROOT, TEXTS, base_model, once

QV = ["query", "value"]


def method_configs() -> dict:
    import peft

    # name -> (PEFT config, the part a hostile test deletes or corrupts)
    return {
        "dora": (peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, use_dora=True, init_lora_weights=False),
                 "lora_magnitude_vector"),
        "rslora": (peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, use_rslora=True, init_lora_weights=False),
                   "lora_B"),
        "ia3": (peft.IA3Config(target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"],
                               init_ia3_weights=False), "ia3_l"),
        "loha": (peft.LoHaConfig(r=4, alpha=8, target_modules=QV, init_weights=False), "hada_w2_b"),
        "lokr": (peft.LoKrConfig(r=2, alpha=8, target_modules=QV, init_weights=False, decompose_both=True,
                                 decompose_factor=4), "lokr_w2_a"),
        "adalora": (peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=QV, total_step=10,
                                       init_lora_weights=False), "lora_E"),
        "oft": (peft.OFTConfig(r=0, oft_block_size=8, target_modules=QV, init_weights=False), "oft_R"),
        "boft": (peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=QV, init_weights=False),
                 "boft_s"),
        "vera": (peft.VeraConfig(r=4, target_modules=QV, init_weights=False, save_projection=True),
                 "vera_lambda_b"),
        "fourierft": (peft.FourierFTConfig(n_frequency=10, target_modules=QV, init_weights=False),
                      "fourierft_spectrum"),
        "miss": (peft.MissConfig(r=4, target_modules=QV), "miss_block"),
        "miss_bat": (peft.MissConfig(r=4, target_modules=QV, init_weights="bat"), "miss_block"),
        "c3a": (peft.C3AConfig(block_size=8, target_modules=QV), "c3a_kernel"),
        "hra": (peft.HRAConfig(r=4, target_modules=QV, init_weights=False), "hra_u"),
        "lora_saved": (peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=False,
                                       modules_to_save=["encoder.layer.1.output.dense"]), "lora_A"),
        "randlora": (peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=QV + ["intermediate.dense"]),
                     "randlora_lambda"),
        "shira": (peft.ShiraConfig(r=2, target_modules=QV), "shira_weight"),
        "delora": (peft.DeloraConfig(r=4, target_modules=QV), "delora_B"),
        "gralora": (peft.GraloraConfig(r=4, gralora_k=2, hybrid_r=2, alpha=8, target_modules=QV), "gralora_A"),
        "vblora": (peft.VBLoRAConfig(r=4, num_vectors=16, vector_length=8, init_vector_bank_bound=0.5,
                                     target_modules=QV), "vblora_logits_A"),
        "road": (peft.RoadConfig(variant="road_2", group_size=8, target_modules=QV), "road_theta"),
        "waveft": (peft.WaveFTConfig(n_frequency=20, target_modules=QV), "waveft_spectrum"),
        "ln_tuning": (peft.LNTuningConfig(target_modules=["LayerNorm"]), "ln_tuning_layers.weight"),
        "miss_mini": (peft.MissConfig(r=4, mini_r=8, target_modules=QV, init_weights="mini"), "miss_block"),
        "beft": (peft.BeftConfig(target_modules=QV + ["intermediate.dense"]), "beft_bias"),
        "deft": (peft.DeftConfig(r=4, target_modules=QV + ["intermediate.dense"]), "deft_P"),
        "hira": (peft.HiraConfig(r=4, target_modules=QV + ["intermediate.dense"]), "hira_B"),
        "tokens": (peft.TrainableTokensConfig(target_modules=["word_embeddings"], token_indices=[101, 102, 2054]),
                   "trainable_tokens_delta"),
        "pvera": (peft.PveraConfig(r=4, target_modules=QV + ["intermediate.dense"]), "pvera_lambda_d"),
        "vera_unsaved": (peft.VeraConfig(r=4, target_modules=QV, init_weights=False, save_projection=False),
                         "vera_lambda_d"),
        "peanut": (peft.PeanutConfig(r=8, depth=1, target_modules=QV + ["intermediate.dense"]), "peanut_A"),
        "supertuning": (peft.SupertuningConfig(sparsity=0.9, r=2, target_modules=QV + ["intermediate.dense"]),
                        "supertuning_values"),
        "tinylora": (peft.TinyLoraConfig(r=2, u=4, weight_tying=0.5, target_modules=QV + ["intermediate.dense"]),
                     "tinylora_P"),
        "osf": (peft.OSFConfig(effective_rank=0.75, rank_pattern={"intermediate": 20},
                               target_modules=QV + ["intermediate.dense"]), "osf_svd_params.U_low"),
        "unilora": (peft.UniLoraConfig(r=4, theta_d_length=64, save_indices=True,
                                       target_modules=QV + ["intermediate.dense"]), "unilora_scales_B"),
        "psoft": (peft.PsoftConfig(r=4, psoft_alpha=8, target_modules=QV + ["intermediate.dense"]), "psoft_R.weight"),
        "psoft_plain": (peft.PsoftConfig(r=4, psoft_alpha=8, psoft_orth=False, psoft_mag_a=False, target_modules=QV),
                        "psoft_R.weight"),
        "glora": (peft.GloraConfig(r=4, target_modules=QV + ["intermediate.dense"]), "glora_A.Xu"),
        "glora_vectors": (peft.GloraConfig(r=4, config_A_B="vector", config_C="vector", config_D_E="vector",
                                           target_modules=QV), "glora_C.X"),
        "adamss": (peft.AdamssConfig(r=16, num_subspaces=3, subspace_rank=2,
                                     target_modules=QV + ["intermediate.dense"]), "adamss_A.0"),
        "frod": (peft.FrodConfig(sparse_rate=0.05, target_modules=QV + ["output.dense"]), "frod_lambda_s_values"),
        "unilora_seeded": (peft.UniLoraConfig(r=4, theta_d_length=64, target_modules=QV), "unilora_theta_d"),
    }


METHODS = ["dora", "rslora", "ia3", "loha", "lokr", "adalora", "oft", "boft", "vera", "fourierft", "hra", "miss",
           "miss_bat", "c3a", "lora_saved", "randlora", "shira", "delora", "gralora", "vblora", "road", "waveft",
           "ln_tuning", "miss_mini", "vera_unsaved", "beft", "deft", "hira",
           "pvera", "tokens", "peanut", "supertuning", "tinylora", "osf", "unilora", "psoft",
           "psoft_plain", "glora", "glora_vectors",
           "adamss", "frod"]
# Adapters made with PEFT's get_peft_model on the encoder: sentence-transformers' add_adapter (transformers' PEFT
# integration) refuses tuners with tensors shared by every layer (VeRA, RandLoRA, VBLoRA) or does not know them.
GET_PEFT_MODEL = {"vera", "vera_unsaved", "randlora", "vblora", "shira", "delora", "gralora", "road", "waveft",
                  "ln_tuning", "beft", "deft", "hira", "pvera", "tokens",
                  "peanut", "supertuning", "tinylora", "osf", "unilora",
                  "unilora_seeded", "psoft", "psoft_plain", "glora",
                  "glora_vectors", "adamss", "frod"}
# RoAd's angles, HiRA's element-wise factor, PVeRA's scales, PEANuT's small B, TinyLoRA's and UniLoRA's few
# values, PSOFT's rotation: a nudge of 0.05 barely moves the embeddings
NUDGE = {"road": 0.5, "hira": 0.5, "pvera": 0.5, "peanut": 0.5, "tinylora": 0.5, "unilora": 0.5,
         "unilora_seeded": 0.5, "psoft": 0.5, "psoft_plain": 0.5}


def method_adapter(name: str) -> Path:
    """An adapter made the sentence-transformers way (add_adapter + save_pretrained) on the tiny BERT, with every
    trained tensor moved off its initial value (identity-at-init methods would otherwise be no-ops)."""
    def build() -> Path:
        import torch
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(base_model()), device="cpu")
        torch.manual_seed(7)
        config = method_configs()[name][0]
        if name in GET_PEFT_MODEL:
            from peft import get_peft_model

            model = get_peft_model(model[0].auto_model, config)
        else:
            model.add_adapter(config)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param.requires_grad:
                    param.add_(NUDGE.get(name, 0.05) * torch.randn_like(param))
        folder = ROOT / f"method-{name}"
        model.save_pretrained(str(folder))
        return folder

    return once(f"method-{name}", build)


def eager(name: str) -> np.ndarray:
    """sentence-transformers with the adapter loaded by PEFT itself (PeftModel.from_pretrained on its encoder).
    Not ``model.load_adapter``: transformers' loader drops DoRA's lora_magnitude_vector (it looks for a
    ``.weight`` key PEFT does not write), so it is no reference for DoRA."""
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(base_model()), device="cpu")
    model[0].auto_model = PeftModel.from_pretrained(model[0].auto_model, str(method_adapter(name)))
    return model.eval().encode(TEXTS, batch_size=3)
