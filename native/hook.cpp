// hook.cpp - the hook's C API: lifetime, parameters, plans, and the begin / end of each decode
// (the eval callback itself is in callback.cpp).
#include "fgdilp.h"
#include "internal.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <new>

#ifndef FGDILP_LLAMA_CPP_PYTHON_VERSION
#define FGDILP_LLAMA_CPP_PYTHON_VERSION "unknown"
#endif

#ifdef FGDILP_TESTING
static int32_t g_fail_alloc_after = -1;
static bool    g_force_device     = false;

void fgdilp::alloc_checkpoint() {
    if (g_fail_alloc_after >= 0 && g_fail_alloc_after-- == 0) {
        throw std::bad_alloc();
    }
}

extern "C" void fgdilp_test_fail_alloc_after(int32_t n) { g_fail_alloc_after = n; }
extern "C" void fgdilp_test_force_device_path(bool on) { g_force_device = on; }
bool fgdilp::force_device_path() { return g_force_device; }
#endif

extern "C" {

struct fgdilp_hook_params fgdilp_hook_default_params(void) {
    fgdilp_hook_params p;
    p.n_layer     = 0;
    p.n_head      = 0;
    p.head_dim    = 0;
    p.n_slots     = 4;
    p.exp_norm    = 0.4f;
    p.exp_sim     = 0.6f;
    p.scale       = 1.0f;
    p.layer_start = 0;
    p.layer_end   = -1;
    p.renorm      = true;
    return p;
}

int32_t fgdilp_hook_check_params(const struct fgdilp_hook_params * params) {
    if (params == nullptr) {
        return FGDILP_ERR_ARG;
    }
    const fgdilp_hook_params & p = *params;
    const int64_t width = (int64_t) p.n_head * (int64_t) p.head_dim; // 64-bit: no overflow
    const int32_t end = p.layer_end == -1 ? p.n_layer - 1 : p.layer_end;
    if (p.n_layer < 1 || p.n_layer > FGDILP_MAX_LAYER || p.n_head < 1 || p.head_dim < 1 ||
        width > INT32_MAX || p.n_slots < 0 || p.n_slots > FGDILP_MAX_SLOTS ||
        p.layer_start < 0 || p.layer_start >= p.n_layer || end < p.layer_start || end >= p.n_layer) {
        return FGDILP_ERR_ARG;
    }
    const float values[3] = {p.exp_norm, p.exp_sim, p.scale};
    return fgdilp::all_finite(values, 3) ? FGDILP_OK : FGDILP_ERR_NONFINITE;
}

fgdilp_hook * fgdilp_hook_init(const struct fgdilp_hook_params * params) {
    if (fgdilp_hook_check_params(params) != FGDILP_OK) {
        return nullptr;
    }
    fgdilp_hook * h = new (std::nothrow) fgdilp_hook();
    if (h == nullptr) {
        return nullptr;
    }
    try {
        h->p     = *params;
        h->width = (size_t) params->n_head * (size_t) params->head_dim;
        const size_t n_layer = (size_t) params->n_layer;
        fgdilp::alloc_checkpoint();
        h->slots.assign((size_t) params->n_slots * n_layer * h->width, 0.0f);
        fgdilp::alloc_checkpoint();
        h->layer_scales.assign(n_layer, 0.0f);
        const int32_t end = params->layer_end == -1 ? params->n_layer - 1 : params->layer_end;
        for (int32_t il = params->layer_start; il <= end; ++il) {
            h->layer_scales[il] = params->scale;
        }
        fgdilp::alloc_checkpoint();
        h->fired.assign(n_layer, 0);
        h->fusion = fgdilp_fusion_default_params();
        fgdilp::alloc_checkpoint();
        h->deltas.assign((size_t) FGDILP_MAX_NEG * h->width, 0.0f);
        h->delta.assign(h->width, 0.0f);
        fgdilp::alloc_checkpoint();
        h->fuse_masked.assign((size_t) FGDILP_MAX_NEG * h->width, 0.0f);
        h->fuse_abs.assign(h->width, 0.0f);
        h->fuse_signs.assign(h->width, 0);
        fgdilp::alloc_checkpoint();
        h->head_scales.assign(n_layer * (size_t) params->n_head, 1.0f);
        h->head_edited.assign((size_t) params->n_head, 0);
    } catch (const std::exception &) { // bad_alloc, or length_error past max_size()
        delete h;
        return nullptr;
    }
    return h;
}

void fgdilp_hook_free(fgdilp_hook * hook) {
    delete hook;
}

int32_t fgdilp_hook_set_layer_scales(fgdilp_hook * hook, const float * scales, int32_t n) {
    if (hook == nullptr || scales == nullptr || n != hook->p.n_layer) {
        return FGDILP_ERR_ARG;
    }
    if (!fgdilp::all_finite(scales, (size_t) n)) {
        return FGDILP_ERR_NONFINITE;
    }
    hook->layer_scales.assign(scales, scales + n);
    return FGDILP_OK;
}

int32_t fgdilp_hook_set_fusion(fgdilp_hook * hook, const struct fgdilp_fusion_params * params) {
    if (hook == nullptr || params == nullptr || !fgdilp::fusion_params_ok(*params) ||
        (params->norm_heads != 0 && params->norm_heads != hook->p.n_head)) {
        return FGDILP_ERR_ARG;
    }
    hook->fusion = *params;
    return FGDILP_OK;
}

int32_t fgdilp_hook_set_edit_rule(fgdilp_hook * hook, int32_t rule) {
    if (hook == nullptr || !fgdilp::edit_rule_ok(rule)) {
        return FGDILP_ERR_ARG;
    }
    hook->edit_rule = rule;
    return FGDILP_OK;
}

int32_t fgdilp_hook_set_gate(fgdilp_hook * hook, bool on, float theta) {
    if (hook == nullptr) {
        return FGDILP_ERR_ARG;
    }
    if (on && !std::isfinite(theta)) {
        return FGDILP_ERR_NONFINITE;
    }
    if (on && !(theta >= -1.0f && theta < 1.0f)) { // cos > theta >= 1 would never edit: refused
        return FGDILP_ERR_ARG;
    }
    hook->gated = on;
    hook->gate  = on ? theta : 0.0f;
    return FGDILP_OK;
}

int32_t fgdilp_hook_set_head_scales(fgdilp_hook * hook, const float * scales, int32_t n) {
    if (hook == nullptr) {
        return FGDILP_ERR_ARG;
    }
    if (scales == nullptr) {
        std::fill(hook->head_scales.begin(), hook->head_scales.end(), 1.0f);
        return FGDILP_OK;
    }
    if (n < 0 || (size_t) n != hook->head_scales.size()) {
        return FGDILP_ERR_ARG;
    }
    if (!fgdilp::all_finite(scales, (size_t) n)) {
        return FGDILP_ERR_NONFINITE;
    }
    for (int32_t i = 0; i < n; ++i) {
        if (scales[i] < 0.0f) {
            return FGDILP_ERR_ARG;
        }
    }
    std::copy(scales, scales + n, hook->head_scales.begin());
    return FGDILP_OK;
}

int32_t fgdilp_hook_set_exponents(fgdilp_hook * hook, float exp_norm, float exp_sim, bool renorm) {
    if (hook == nullptr) {
        return FGDILP_ERR_ARG;
    }
    const float e[2] = {exp_norm, exp_sim};
    if (!fgdilp::all_finite(e, 2)) {
        return FGDILP_ERR_NONFINITE;
    }
    hook->p.exp_norm = exp_norm;
    hook->p.exp_sim  = exp_sim;
    hook->p.renorm   = renorm;
    return FGDILP_OK;
}

int32_t fgdilp_hook_set_plan(fgdilp_hook * hook,
                             const struct fgdilp_capture * captures, int32_t n_captures,
                             const struct fgdilp_edit * edits, int32_t n_edits) {
    if (hook == nullptr) {
        return FGDILP_ERR_ARG;
    }
    // built aside and moved in only when whole: a refusal or bad_alloc keeps the old plan
    return fgdilp::compile_plan(captures, n_captures, edits, n_edits, hook->p.n_slots, hook->width, hook->plan);
}

float * fgdilp_hook_slots(fgdilp_hook * hook) {
    return hook == nullptr ? nullptr : hook->slots.data();
}

int32_t fgdilp_hook_check_slots(const fgdilp_hook * hook) {
    if (hook == nullptr) {
        return FGDILP_ERR_ARG;
    }
    return fgdilp::all_finite(hook->slots.data(), hook->slots.size()) ? FGDILP_OK : FGDILP_ERR_NONFINITE;
}

int32_t fgdilp_hook_begin(fgdilp_hook * hook, int32_t n_tokens) {
    if (hook == nullptr) {
        return FGDILP_ERR_ARG;
    }
    std::fill(hook->fired.begin(), hook->fired.end(), 0);
    hook->n_fired         = 0;
    hook->n_edits_applied = 0;
    hook->n_heads_edited  = 0;
    hook->status          = FGDILP_OK;
    hook->error[0]        = '\0';
    hook->n_tokens        = -1; // until the checks below pass: the callback refuses the decode
    char msg[160];
    if (n_tokens < 1) {
        std::snprintf(msg, sizeof msg, "a decode of %d tokens (needs at least 1)", n_tokens);
        hook->fail(FGDILP_ERR_ARG, msg);
    } else if (hook->plan.max_row >= n_tokens) {
        std::snprintf(msg, sizeof msg, "the plan names row %d but the decode has %d tokens",
                      hook->plan.max_row, n_tokens);
        hook->fail(FGDILP_ERR_ROW, msg);
    } else {
        hook->n_tokens = n_tokens;
    }
    return hook->status;
}

int32_t fgdilp_hook_end(fgdilp_hook * hook) {
    if (hook == nullptr) {
        return FGDILP_ERR_ARG;
    }
    if (!hook->plan.empty() && hook->status == FGDILP_OK && hook->n_fired < hook->p.n_layer) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "the kqv_out hook fired on %d of %d layers",
                      hook->n_fired, hook->p.n_layer);
        hook->fail(FGDILP_ERR_NOT_FIRED, msg);
    }
    hook->n_tokens = -1; // the next decode needs its own begin
    return hook->status;
}

int32_t fgdilp_hook_fired_layers(const fgdilp_hook * hook) {
    return hook == nullptr ? 0 : hook->n_fired;
}

int32_t fgdilp_hook_edits_applied(const fgdilp_hook * hook) {
    return hook == nullptr ? 0 : hook->n_edits_applied;
}

int32_t fgdilp_hook_heads_edited(const fgdilp_hook * hook) {
    return hook == nullptr ? 0 : hook->n_heads_edited;
}

const char * fgdilp_hook_last_error(const fgdilp_hook * hook) {
    return hook == nullptr ? "null hook" : hook->error;
}

bool fgdilp_abort_flag(void * data) {
    return data != nullptr && __atomic_load_n((const int32_t *) data, __ATOMIC_RELAXED) != 0;
}

void fgdilp_log_discard(int32_t level, const char * text, void * user_data) {
    (void) level;
    (void) text;
    (void) user_data;
}

const char * fgdilp_build_llama_cpp_python_version(void) {
    return FGDILP_LLAMA_CPP_PYTHON_VERSION;
}

} // extern "C"
