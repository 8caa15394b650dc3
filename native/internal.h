// internal.h - helpers shared by the native sources (not part of the C API).
#pragma once

#include <cstddef>
#include <cstdint>

struct fgdilp_fusion_params;

namespace fgdilp {

// TR edit of one layer row in place (see fgdilp_tr_edit_row).
void tr_edit_row(float * v, const float * delta, const float * e, int n_head, int head_dim,
                 float exp_norm, float exp_sim, float scale, bool renorm);

// True when no element is NaN or inf.
bool all_finite(const float * x, size_t n);

// Fusion of sub-toxicity vectors (see fgdilp_fuse); mirrors fgdilp_cpp/method/fusion.py.
// Arguments are assumed valid (1 <= n <= FGDILP_MAX_NEG, width >= 1, K in (0, 100], known mode).

// K in (0, 100] and a known mode.
bool fusion_params_ok(const fgdilp_fusion_params & p);

// n_keep = ceil(K * width / 100) in double, clamped to [1, width].
int keep_count(int width, float k_pct);

// Keep the n_keep entries of delta [width] with the largest |value| (ties: lower index first),
// zero the rest, into out [width]. scratch [width] is overwritten.
void mask_top_k(const float * delta, int width, float k_pct, float * out, float * scratch);

// Elected sign (+1 / -1) per coordinate of masked [n][width] into signs [width].
void elect_signs(const float * masked, int n, int width, int8_t * signs);

// Caller-owned work memory of fuse, so the eval callback never allocates.
struct fusion_scratch {
    float *  masked; // [n][width]
    float *  abs;    // [width]
    int8_t * signs;  // [width]
};

// Fuse deltas [n][width] into out [width]. Returns FGDILP_OK, or FGDILP_ERR_NONFINITE (out untouched).
int32_t fuse(const float * deltas, int n, int width, const fgdilp_fusion_params & params, float * out,
             const fusion_scratch & scratch);

} // namespace fgdilp
