// fgdilp.h - capture and edit llama.cpp attention outputs (kqv_out-<layer>) from the eval callback.
//
// The hook is installed once, when the llama context is created:
//     cparams.cb_eval           = fgdilp_hook_eval_callback;
//     cparams.cb_eval_user_data = hook;
// Before each llama_decode the caller describes what the rows of the batch are (a plan): rows to
// capture into slots, and rows to edit (the Toxification-Reversal rule, or rotate; optionally gated per
// head and with per-head strengths: fgdilp_hook_set_edit_rule / _set_gate / _set_head_scales). One ubatch per decode
// (n_ubatch >= the batch) keeps "row i of kqv_out = token i of the batch"; the hook checks it
// (every kqv_out node must have the n_tokens rows given to fgdilp_hook_begin).
// A decode in which the hook finds an error (a node it cannot read, a row count that is not the
// batch's, a layer seen twice, a steered row that is NaN or inf) is cut short: the callback returns
// false (ggml skips the rest of that graph split), leaves that layer's rows as the model computed
// them, and fgdilp_hook_end reports the error. That decode's outputs must not be used.
//
// Layout: a layer row has width W = n_head * head_dim; head h is [h*head_dim, (h+1)*head_dim).
// Slots are host vectors [n_slots][n_layer][W] owned by the hook (e vectors, fixed directions,
// captures); the caller may read and write them through fgdilp_hook_slots().
#pragma once

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_tensor;

#define FGDILP_MAX_NEG 8

enum fgdilp_status {
    FGDILP_OK            =  0,
    FGDILP_ERR_ARG       = -1, // bad argument (null, out of range), or a decode without fgdilp_hook_begin
    FGDILP_ERR_TENSOR    = -2, // kqv_out not F32 / not contiguous / unexpected op / width mismatch
    FGDILP_ERR_NOT_FIRED = -3, // a planned decode saw the hook fire on fewer layers than expected
    FGDILP_ERR_ROW       = -4, // a planned row >= n_tokens, or a kqv_out whose row count is not n_tokens
    FGDILP_ERR_NONFINITE = -5, // NaN or inf in an input vector or in a steered row
    FGDILP_ERR_ALLOC     = -6, // out of memory
    FGDILP_ERR_REFIRED   = -7, // a layer's kqv_out fired twice in one decode
};

#define FGDILP_MAX_LAYER 4096 // largest n_layer
#define FGDILP_MAX_SLOTS 4096 // largest n_slots

struct fgdilp_hook_params {
    int32_t n_layer;     // model layers, 1..FGDILP_MAX_LAYER
    int32_t n_head;      // query heads, >= 1
    int32_t head_dim;    // value head dim (kqv_out width / n_head), >= 1; n_head * head_dim <= INT32_MAX
    int32_t n_slots;     // number of [n_layer][W] slot vectors, 0..FGDILP_MAX_SLOTS
    float   exp_norm;    // a in lambda_norm = (1 + |delta_h|)^a; finite
    float   exp_sim;     // b in lambda_sim  = (1 + max(0, cos(v_h, e_h)))^b; finite
    float   scale;       // global strength, multiplies every layer's edit; finite
    int32_t layer_start; // first steered layer (inclusive), 0..n_layer-1
    int32_t layer_end;   // last steered layer (inclusive), layer_start..n_layer-1; -1 = last layer
    bool    renorm;      // rescale the edited layer row to the norm it had before the edit
};

// How fgdilp_fuse merges the masked sub-toxicity vectors that agree with the elected sign.
enum fgdilp_fusion_mode {
    FGDILP_FUSION_MAX  = 0, // elect on: s_c * max |m_j[c]|; elect off: the m_j[c] of largest |.| (first j)
    FGDILP_FUSION_MEAN = 1, // mean of the agreeing m_j[c]
    FGDILP_FUSION_SUM  = 2, // sum of the agreeing m_j[c]
};

// FGDILP fusion (docs/method.md §5): masking, sign election, merge.
struct fgdilp_fusion_params {
    float   k_pct;      // keep the top-K % entries of each vector by |value|, K in (0, 100]; 100 keeps all
    int32_t mode;       // enum fgdilp_fusion_mode
    bool    elect;      // sign election on; off: every nonzero entry agrees
    int32_t norm_heads; // 0: no rescale; n > 0 (width % n == 0): rescale each of the n head blocks of the
                        // fused row to the norm of that block of mean_j(delta_j) (--fused-norm mean-delta, §5.6)
};

// How a steered row is changed (docs/method.md §2.2, §2.6).
enum fgdilp_edit_rule {
    FGDILP_EDIT_TR     = 0, // v_h - k_h * delta_h, then the row renormalised (renorm on)
    FGDILP_EDIT_ROTATE = 1, // |v_h| * unit(unit(v_h) - k_h * unit(delta_h)): every head keeps its norm
};

// One row edit's rule and values; k_h = scale * head_scale_h * lambda_norm_h * lambda_sim_h.
struct fgdilp_edit_params {
    int32_t rule;     // enum fgdilp_edit_rule
    float   exp_norm; // a of lambda_norm
    float   exp_sim;  // b of lambda_sim
    float   scale;    // the layer's strength s_l
    bool    renorm;   // TR only: rescale the edited heads together to their norm before the edit
    bool    gated;    // edit head h only where cos(v_h, delta_h) > gate (docs/method.md §2.7)
    float   gate;     // theta in [-1, 1)
};

// One P0 row edited in place at every steered layer.
// dir_slot < 0: delta = fuse(a(neg_rows[j]) - a(pos_row), j < n_neg) with the hook's fusion params
// (fgdilp_hook_set_fusion), 1 <= n_neg <= FGDILP_MAX_NEG; else delta = slot dir_slot.
// The default fusion K = 50 masks even a single negative's delta: plain TR with one negative
// needs K = 100 (then the fused delta is a(neg) - a(pos) exactly).
struct fgdilp_edit {
    int32_t target_row;                // row edited in place (P0's last position)
    int32_t pos_row;                   // positive-prefix row, or -1 with dir_slot
    int32_t neg_rows[FGDILP_MAX_NEG];  // negative-prefix rows
    int32_t n_neg;                     // number of negative rows used (1 for TR, up to 6 for FGDILP)
    int32_t dir_slot;                  // fixed direction slot, or -1 to use the rows
    int32_t e_slot;                    // slot holding e, or -1 for lambda_sim = 1
};

// Copy row `row` of every layer's kqv_out into slot `slot` (before any edit of this decode).
struct fgdilp_capture {
    int32_t row;
    int32_t slot;
};

typedef struct fgdilp_hook fgdilp_hook;

// Defaults of docs/method.md §10: exponents 0.4 / 0.6, scale 1, all layers, renorm on, 4 slots.
struct fgdilp_hook_params fgdilp_hook_default_params(void);

// FGDILP_OK, FGDILP_ERR_ARG (NULL, a size or the layer range out of range) or FGDILP_ERR_NONFINITE
// (scale or an exponent NaN or inf): what fgdilp_hook_init would refuse, and why.
int32_t fgdilp_hook_check_params(const struct fgdilp_hook_params * params);

// Allocate a hook for a model of the given shape; NULL on params that fgdilp_hook_check_params refuses or no memory.
fgdilp_hook * fgdilp_hook_init(const struct fgdilp_hook_params * params);

// Free a hook; the context that uses it must be freed first. NULL is a no-op.
void fgdilp_hook_free(fgdilp_hook * hook);

// The ggml eval callback; pass the hook as user_data. Returns false (the scheduler stops the graph
// split) once the decode has an error; fgdilp_hook_end then reports it.
bool fgdilp_hook_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);

// Set the per-layer strength ([n_layer], replaces the params' scale and layer range).
int32_t fgdilp_hook_set_layer_scales(fgdilp_hook * hook, const float * scales, int32_t n);

// Fusion params of the following decodes' row edits (init: defaults); FGDILP_ERR_ARG on bad K / mode.
int32_t fgdilp_hook_set_fusion(fgdilp_hook * hook, const struct fgdilp_fusion_params * params);

// Change exponents / renorm between decodes.
int32_t fgdilp_hook_set_exponents(fgdilp_hook * hook, float exp_norm, float exp_sim, bool renorm);

// Edit rule of the following decodes (init: FGDILP_EDIT_TR); FGDILP_ERR_ARG on an unknown rule.
int32_t fgdilp_hook_set_edit_rule(fgdilp_hook * hook, int32_t rule);

// Gate of the following decodes (init: off): with on, a head is edited only where
// cos(v_h, delta_h) > theta, the others keep their bits. FGDILP_ERR_NONFINITE (theta NaN / inf),
// FGDILP_ERR_ARG (theta outside [-1, 1)); theta is ignored when off.
int32_t fgdilp_hook_set_gate(fgdilp_hook * hook, bool on, float theta);

// Per-head strength [n_layer * n_head] (layer-major) multiplying each head's k (init: all 1); a head at
// 0 keeps its bits. NULL resets to 1. FGDILP_ERR_ARG (n != n_layer * n_head, a negative value),
// FGDILP_ERR_NONFINITE.
int32_t fgdilp_hook_set_head_scales(fgdilp_hook * hook, const float * scales, int32_t n);

// Replace the plan used by the following decodes (arrays are copied). An empty plan asks for no node.
// On any error (FGDILP_ERR_ARG, FGDILP_ERR_ALLOC) the previous plan stays in force, unchanged.
int32_t fgdilp_hook_set_plan(fgdilp_hook * hook,
                             const struct fgdilp_capture * captures, int32_t n_captures,
                             const struct fgdilp_edit * edits, int32_t n_edits);

// Pointer to the slots, [n_slots][n_layer][W] floats, valid until fgdilp_hook_free.
float * fgdilp_hook_slots(fgdilp_hook * hook);

// Reject slots holding NaN or inf (call after writing slots): FGDILP_OK or FGDILP_ERR_NONFINITE.
int32_t fgdilp_hook_check_slots(const fgdilp_hook * hook);

// Call right before llama_decode of a batch of n_tokens rows (one ubatch): clears the per-decode
// counters and errors. FGDILP_ERR_ARG for n_tokens < 1, FGDILP_ERR_ROW when the plan names a row
// >= n_tokens: then do not decode (a decode run anyway is refused by the callback).
int32_t fgdilp_hook_begin(fgdilp_hook * hook, int32_t n_tokens);

// Call right after llama_decode: FGDILP_OK, or the first error seen in that decode (or in begin).
int32_t fgdilp_hook_end(fgdilp_hook * hook);

// Layers whose kqv_out fired in the last decode (with a non-empty plan).
int32_t fgdilp_hook_fired_layers(const fgdilp_hook * hook);

// Rows edited in the last decode, summed over layers.
int32_t fgdilp_hook_edits_applied(const fgdilp_hook * hook);

// Heads edited in the last decode, summed over rows and layers (gated and zero-scale heads not counted).
int32_t fgdilp_hook_heads_edited(const fgdilp_hook * hook);

// Last error as text ("" when none).
const char * fgdilp_hook_last_error(const fgdilp_hook * hook);

// llama_context_params.abort_callback for cancelling a decode from another thread: returns true
// once the int32 that `data` points to is non-zero (set it atomically; no Python in the loop).
bool fgdilp_abort_flag(void * data);

// A ggml_log_callback that drops the text: installed with llama_log_set when the interpreter exits,
// so llama.cpp objects freed during its shutdown never call a Python callback that is already gone.
void fgdilp_log_discard(int32_t level, const char * text, void * user_data);

// Build identity: the llama-cpp-python version this library was compiled against.
const char * fgdilp_build_llama_cpp_python_version(void);

// The TR edit of one layer row v [n_head*head_dim] in place; the reference the hook uses.
// e may be NULL (lambda_sim = 1). Returns FGDILP_OK, or FGDILP_ERR_ARG (n_head * head_dim > INT32_MAX);
// v is not checked for NaN or inf afterwards (the hook does that).
int32_t fgdilp_tr_edit_row(float * v, const float * delta, const float * e,
                           int32_t n_head, int32_t head_dim,
                           float exp_norm, float exp_sim, float scale, bool renorm);

// Defaults of the edit: TR, exponents 0.4 / 0.6, scale 1, renorm on, gate off.
struct fgdilp_edit_params fgdilp_edit_default_params(void);

// One layer row v [n_head*head_dim] edited in place by params (the hook's own code); head_scales
// [n_head] or NULL (all 1). Returns the number of heads edited (>= 0), or FGDILP_ERR_ARG (a NULL
// pointer, a bad size or rule), FGDILP_ERR_ALLOC. v is not checked for NaN or inf afterwards.
int32_t fgdilp_edit_row(float * v, const float * delta, const float * e, const float * head_scales,
                        int32_t n_head, int32_t head_dim, const struct fgdilp_edit_params * params);

// Defaults of docs/method.md §10: K = 50, max, sign election on, no rescale.
struct fgdilp_fusion_params fgdilp_fusion_default_params(void);

// Fuse deltas [n][width] (1 <= n <= FGDILP_MAX_NEG) into out [width]; ERR_ARG, or ERR_NONFINITE (out untouched).
int32_t fgdilp_fuse(const float * deltas, int32_t n, int32_t width,
                    const struct fgdilp_fusion_params * params, float * out);

#ifdef __cplusplus
}
#endif
