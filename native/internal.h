// internal.h - helpers shared by the native sources (not part of the C API).
#pragma once

#include "fgdilp.h"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace fgdilp {

// Test builds: treat every kqv_out as living in a device buffer (see fgdilp_test_force_device_path).
#ifdef FGDILP_TESTING
bool force_device_path();
#else
inline bool force_device_path() { return false; }
#endif

// Throws std::bad_alloc where a test build (FGDILP_TESTING) asks it to; a no-op otherwise.
// Called before each allocation of fgdilp_hook_init and fgdilp_hook_set_plan.
#ifdef FGDILP_TESTING
void alloc_checkpoint();
#else
inline void alloc_checkpoint() {}
#endif

// A known enum fgdilp_edit_rule.
bool edit_rule_ok(int32_t rule);

// The edit of one layer row in place by params (see fgdilp_edit_row): rule, gate, per-head scales
// [n_head] or null. edited [n_head] is scratch. Returns the number of heads edited.
int edit_row(float * v, const float * delta, const float * e, const float * head_scales, int n_head,
             int head_dim, const fgdilp_edit_params & params, uint8_t * edited);

// --fused-norm mean-delta: rescale each of n_heads blocks of fused [width] to the norm of that block of
// mean_j(deltas[j]) (a block whose mean is zero becomes zero). Mirrors method/fusion.py.
void rescale_to_mean_delta(const float * deltas, int n, int width, int n_heads, float * fused);

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

// Places (indices into plan_state::rows and row_buf) of the rows one edit reads.
struct edit_places {
    int32_t target;
    int32_t pos;                       // -1 with a direction slot
    int32_t neg[FGDILP_MAX_NEG];
};

// A validated plan laid out for the callback, which then neither walks it nor allocates.
// Its memory grows with the number of rows the plan names, never with their values.
struct plan_state {
    std::vector<fgdilp_capture> captures;
    std::vector<fgdilp_edit>    edits;
    std::vector<int32_t>        rows;          // distinct rows the plan names, ascending
    std::vector<int32_t>        capture_place; // [n_captures] place of each capture's row
    std::vector<edit_places>    edit_place;    // [n_edits]
    std::vector<float>          row_buf;       // [rows][width]: rows fetched from a device buffer
    std::vector<float>          out_buf;       // [n_edits][width]: edited rows, written once all are finite
    int32_t max_row = -1;                      // largest row named, -1 when none

    bool empty() const { return captures.empty() && edits.empty(); }
};

// Validate a plan (rows >= 0, slots < n_slots, 1..FGDILP_MAX_NEG negatives) and build it into `out`.
// FGDILP_OK, FGDILP_ERR_ARG, or FGDILP_ERR_ALLOC; `out` is written only on FGDILP_OK.
int32_t compile_plan(const fgdilp_capture * captures, int32_t n_captures, const fgdilp_edit * edits,
                     int32_t n_edits, int32_t n_slots, size_t width, plan_state & out);

} // namespace fgdilp

// The hook behind the opaque fgdilp_hook handle.
struct fgdilp_hook {
    fgdilp_hook_params p;
    size_t width = 0;                      // n_head * head_dim, <= INT32_MAX
    std::vector<float> slots;              // [n_slots][n_layer][width]
    std::vector<float> layer_scales;       // [n_layer]
    fgdilp::plan_state plan;               // replaced whole by set_plan
    fgdilp_fusion_params fusion;           // how the rows' sub-toxicity vectors are fused
    int32_t edit_rule = FGDILP_EDIT_TR;    // enum fgdilp_edit_rule
    bool gated = false;                    // fgdilp_hook_set_gate
    float gate = 0.0f;
    std::vector<float> head_scales;        // [n_layer][n_head], 1 unless set

    // per decode
    int32_t n_tokens = -1;                 // rows of the decode (fgdilp_hook_begin); -1 outside one
    std::vector<uint8_t> fired;            // [n_layer]
    int32_t n_fired = 0;
    int32_t n_edits_applied = 0;
    int32_t n_heads_edited = 0;
    int32_t status = FGDILP_OK;
    char error[320] = "";

    // scratch, reused across calls
    std::vector<float> deltas;             // a(neg_j) - a(pos) [FGDILP_MAX_NEG][width]
    std::vector<float> delta;              // fused [width]
    std::vector<float> fuse_masked;        // fusion scratch [FGDILP_MAX_NEG][width]
    std::vector<float> fuse_abs;           // fusion scratch [width]
    std::vector<int8_t> fuse_signs;        // fusion scratch [width]
    std::vector<uint8_t> head_edited;      // edit scratch [n_head]

    // record the decode's first error (later ones would only be its consequences); a fixed
    // buffer, so that the callback never allocates (nor throws into llama.cpp)
    void fail(int32_t code, const char * msg) {
        if (status == FGDILP_OK) {
            status = code;
            std::snprintf(error, sizeof error, "%s", msg);
        }
    }

    float * slot(int32_t s, int32_t layer) {
        return slots.data() + ((size_t) s * (size_t) p.n_layer + (size_t) layer) * width;
    }
};

#ifdef FGDILP_TESTING
// Test builds only (not part of the C API).
extern "C" {
// The n-th alloc_checkpoint from now throws std::bad_alloc (0 = the next one); -1 never.
void fgdilp_test_fail_alloc_after(int32_t n);
// Treat every kqv_out as living in a device buffer (ggml_backend_tensor_get/set), as on a GPU.
void fgdilp_test_force_device_path(bool on);
}
#endif
