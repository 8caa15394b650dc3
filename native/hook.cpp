// hook.cpp - the eval callback: ask for kqv_out-<il>, capture planned rows, edit P0 rows in place.
#include "fgdilp.h"
#include "internal.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#ifndef FGDILP_LLAMA_CPP_PYTHON_VERSION
#define FGDILP_LLAMA_CPP_PYTHON_VERSION "unknown"
#endif

static const char KQV_PREFIX[] = "kqv_out-";

struct fgdilp_hook {
    fgdilp_hook_params p;
    int width = 0;                         // n_head * head_dim
    std::vector<float> slots;              // [n_slots][n_layer][width]
    std::vector<float> layer_scales;       // [n_layer]
    std::vector<fgdilp_capture> captures;
    std::vector<fgdilp_edit> edits;
    int32_t max_row = -1;                  // largest row named by the plan
    fgdilp_fusion_params fusion;           // how the rows' sub-toxicity vectors are fused

    // per decode
    std::vector<uint8_t> fired;            // [n_layer]
    int32_t n_fired = 0;
    int32_t n_edits_applied = 0;
    int32_t status = FGDILP_OK;
    std::string error;

    // scratch, reused across calls
    std::vector<int32_t> row_index;        // row -> index into row_buf, -1 when not fetched
    std::vector<float> row_buf;            // fetched rows (device buffers) [n][width]
    std::vector<float> out_buf;            // edited rows [n_edits][width]
    std::vector<uint8_t> out_ok;           // [n_edits]: 0 when the edit was skipped
    std::vector<float> deltas;             // a(neg_j) - a(pos) [FGDILP_MAX_NEG][width]
    std::vector<float> delta;              // fused [width]
    std::vector<float> fuse_masked;        // fusion scratch [FGDILP_MAX_NEG][width]
    std::vector<float> fuse_abs;           // fusion scratch [width]
    std::vector<int8_t> fuse_signs;        // fusion scratch [width]

    float * slot(int s, int layer) { return slots.data() + ((size_t) s * p.n_layer + layer) * width; }
};

static void set_error(fgdilp_hook * h, int32_t code, const std::string & msg) {
    if (h->status == FGDILP_OK) {
        h->status = code;
        h->error  = msg;
    }
}

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

fgdilp_hook * fgdilp_hook_init(const struct fgdilp_hook_params * params) {
    if (params == nullptr || params->n_layer <= 0 || params->n_head <= 0 || params->head_dim <= 0 ||
        params->n_slots < 0 || params->n_layer > 4096 || params->n_slots > 4096) {
        return nullptr;
    }
    fgdilp_hook * h = new (std::nothrow) fgdilp_hook();
    if (h == nullptr) {
        return nullptr;
    }
    try {
        h->p     = *params;
        h->width = params->n_head * params->head_dim;
        h->slots.assign((size_t) params->n_slots * params->n_layer * h->width, 0.0f);
        h->layer_scales.assign(params->n_layer, 0.0f);
        const int end = params->layer_end < 0 ? params->n_layer - 1 : params->layer_end;
        for (int il = 0; il < params->n_layer; ++il) {
            if (il >= params->layer_start && il <= end) {
                h->layer_scales[il] = params->scale;
            }
        }
        h->fired.assign(params->n_layer, 0);
        h->fusion = fgdilp_fusion_default_params();
        h->deltas.assign((size_t) FGDILP_MAX_NEG * h->width, 0.0f);
        h->delta.assign(h->width, 0.0f);
        h->fuse_masked.assign((size_t) FGDILP_MAX_NEG * h->width, 0.0f);
        h->fuse_abs.assign(h->width, 0.0f);
        h->fuse_signs.assign(h->width, 0);
    } catch (const std::bad_alloc &) {
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
    if (hook == nullptr || params == nullptr || !fgdilp::fusion_params_ok(*params)) {
        return FGDILP_ERR_ARG;
    }
    hook->fusion = *params;
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
    if (hook == nullptr || n_captures < 0 || n_edits < 0 ||
        (n_captures > 0 && captures == nullptr) || (n_edits > 0 && edits == nullptr)) {
        return FGDILP_ERR_ARG;
    }
    const int32_t n_slots = hook->p.n_slots;
    int32_t max_row = -1;
    auto see_row = [&](int32_t r) {
        if (r > max_row) {
            max_row = r;
        }
        return r >= 0;
    };
    for (int32_t i = 0; i < n_captures; ++i) {
        if (!see_row(captures[i].row) || captures[i].slot < 0 || captures[i].slot >= n_slots) {
            return FGDILP_ERR_ARG;
        }
    }
    for (int32_t i = 0; i < n_edits; ++i) {
        const fgdilp_edit & e = edits[i];
        if (!see_row(e.target_row) || e.e_slot >= n_slots || e.dir_slot >= n_slots) {
            return FGDILP_ERR_ARG;
        }
        if (e.dir_slot < 0) {
            // rows: one positive and 1..FGDILP_MAX_NEG negative rows, fused
            if (!see_row(e.pos_row) || e.n_neg < 1 || e.n_neg > FGDILP_MAX_NEG) {
                return FGDILP_ERR_ARG;
            }
            for (int32_t j = 0; j < e.n_neg; ++j) {
                if (!see_row(e.neg_rows[j])) {
                    return FGDILP_ERR_ARG;
                }
            }
        }
    }
    try {
        hook->captures.assign(captures, captures + n_captures);
        hook->edits.assign(edits, edits + n_edits);
        hook->out_buf.resize((size_t) n_edits * hook->width);
        hook->out_ok.assign((size_t) n_edits, 0);
        hook->row_index.assign((size_t) max_row + 1, -1);
        // every distinct planned row gets its place in row_buf once per plan, so fetch_rows
        // neither walks the plan nor allocates in the callback
        int32_t n_rows = 0;
        auto place = [&](int32_t r) {
            if (r >= 0 && hook->row_index[r] < 0) {
                hook->row_index[r] = n_rows++;
            }
        };
        for (const auto & c : hook->captures) {
            place(c.row);
        }
        for (const auto & e : hook->edits) {
            place(e.target_row);
            if (e.dir_slot < 0) {
                place(e.pos_row);
                for (int32_t j = 0; j < e.n_neg; ++j) {
                    place(e.neg_rows[j]);
                }
            }
        }
        hook->row_buf.resize((size_t) n_rows * hook->width);
    } catch (const std::bad_alloc &) {
        return FGDILP_ERR_ALLOC;
    }
    hook->max_row = max_row;
    return FGDILP_OK;
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

void fgdilp_hook_begin(fgdilp_hook * hook) {
    if (hook == nullptr) {
        return;
    }
    std::fill(hook->fired.begin(), hook->fired.end(), 0);
    hook->n_fired         = 0;
    hook->n_edits_applied = 0;
    hook->status          = FGDILP_OK;
    hook->error.clear();
}

int32_t fgdilp_hook_end(fgdilp_hook * hook) {
    if (hook == nullptr) {
        return FGDILP_ERR_ARG;
    }
    const bool planned = !hook->captures.empty() || !hook->edits.empty();
    if (planned && hook->status == FGDILP_OK && hook->n_fired < hook->p.n_layer) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "the kqv_out hook fired on %d of %d layers",
                      hook->n_fired, hook->p.n_layer);
        set_error(hook, FGDILP_ERR_NOT_FIRED, msg);
    }
    return hook->status;
}

int32_t fgdilp_hook_fired_layers(const fgdilp_hook * hook) {
    return hook == nullptr ? 0 : hook->n_fired;
}

int32_t fgdilp_hook_edits_applied(const fgdilp_hook * hook) {
    return hook == nullptr ? 0 : hook->n_edits_applied;
}

const char * fgdilp_hook_last_error(const fgdilp_hook * hook) {
    return hook == nullptr ? "null hook" : hook->error.c_str();
}

bool fgdilp_abort_flag(void * data) {
    return data != nullptr && __atomic_load_n((const int32_t *) data, __ATOMIC_RELAXED) != 0;
}

const char * fgdilp_build_llama_cpp_python_version(void) {
    return FGDILP_LLAMA_CPP_PYTHON_VERSION;
}

} // extern "C"

// Layer index of a "kqv_out-<il>" name, or -1.
static int kqv_layer(const char * name) {
    if (std::strncmp(name, KQV_PREFIX, sizeof KQV_PREFIX - 1) != 0) {
        return -1;
    }
    const char * s = name + sizeof KQV_PREFIX - 1;
    char * end = nullptr;
    const long il = std::strtol(s, &end, 10);
    if (end == s || *end != '\0' || il < 0 || il > 1000000) {
        return -1;
    }
    return (int) il;
}

// Validate the node; on success returns the number of rows.
static int64_t check_tensor(fgdilp_hook * h, const ggml_tensor * t, int il) {
    char msg[256];
    if (il >= h->p.n_layer) {
        std::snprintf(msg, sizeof msg, "%s: layer %d but the model has %d", t->name, il, h->p.n_layer);
        set_error(h, FGDILP_ERR_TENSOR, msg);
        return -1;
    }
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t) ||
        (t->op != GGML_OP_CONT && t->op != GGML_OP_RESHAPE) || t->ne[0] != h->width ||
        t->ne[2] != 1 || t->ne[3] != 1) {
        std::snprintf(msg, sizeof msg,
                      "%s is not the per-head attention output this hook expects "
                      "(type %s, op %s, ne [%lld, %lld, %lld, %lld], contiguous %d; expected F32 CONT/RESHAPE of width %d)",
                      t->name, ggml_type_name(t->type), ggml_op_name(t->op), (long long) t->ne[0],
                      (long long) t->ne[1], (long long) t->ne[2], (long long) t->ne[3],
                      (int) ggml_is_contiguous(t), h->width);
        set_error(h, FGDILP_ERR_TENSOR, msg);
        return -1;
    }
    if (h->max_row >= t->ne[1]) {
        std::snprintf(msg, sizeof msg, "%s has %lld rows but the plan names row %d", t->name,
                      (long long) t->ne[1], h->max_row);
        set_error(h, FGDILP_ERR_ROW, msg);
        return -1;
    }
    return t->ne[1];
}

// Device buffers: fetch the planned rows into their places in row_buf (set by set_plan; one
// synchronous copy per row).
static void fetch_rows(fgdilp_hook * h, const ggml_tensor * t) {
    const size_t row_bytes = t->nb[1];
    for (int32_t r = 0; r <= h->max_row; ++r) {
        if (h->row_index[r] >= 0) {
            ggml_backend_tensor_get(t, h->row_buf.data() + (size_t) h->row_index[r] * h->width,
                                    (size_t) r * row_bytes, row_bytes);
        }
    }
}

static void on_layer(fgdilp_hook * h, ggml_tensor * t, int il) {
    if (check_tensor(h, t, il) < 0) {
        return;
    }
    if (!h->fired[il]) {
        h->fired[il] = 1;
        h->n_fired++;
    }
    const int width = h->width;
    const bool host = t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer);
    if (!host) {
        fetch_rows(h, t);
    }
    auto row = [&](int32_t r) -> const float * {
        return host ? (const float *) t->data + (size_t) r * width
                    : h->row_buf.data() + (size_t) h->row_index[r] * width;
    };

    for (const auto & c : h->captures) {
        std::memcpy(h->slot(c.slot, il), row(c.row), sizeof(float) * width);
    }

    const float scale = h->layer_scales[il];
    if (scale == 0.0f || h->edits.empty()) {
        return;
    }
    const fgdilp::fusion_scratch scratch = {h->fuse_masked.data(), h->fuse_abs.data(), h->fuse_signs.data()};
    // compute every edit before writing any, so an edit never reads another's output
    for (size_t k = 0; k < h->edits.size(); ++k) {
        const fgdilp_edit & e = h->edits[k];
        h->out_ok[k] = 0;
        const float * delta;
        if (e.dir_slot >= 0) {
            delta = h->slot(e.dir_slot, il);
        } else {
            // sub-toxicity vectors delta_j = a(neg_j) - a(pos), then their fusion
            const float * pos = row(e.pos_row);
            for (int j = 0; j < e.n_neg; ++j) {
                const float * neg = row(e.neg_rows[j]);
                float * dj = h->deltas.data() + (size_t) j * width;
                for (int i = 0; i < width; ++i) {
                    dj[i] = neg[i] - pos[i];
                }
            }
            if (fgdilp::fuse(h->deltas.data(), e.n_neg, width, h->fusion, h->delta.data(), scratch) != FGDILP_OK) {
                char msg[160];
                std::snprintf(msg, sizeof msg, "%s: NaN or inf in the rows of edit %zu (target row %d)",
                              t->name, k, e.target_row);
                set_error(h, FGDILP_ERR_NONFINITE, msg);
                continue; // that row is left as the model computed it
            }
            delta = h->delta.data();
        }
        h->out_ok[k] = 1;
        float * out = h->out_buf.data() + k * width;
        std::memcpy(out, row(e.target_row), sizeof(float) * width);
        const float * ev = e.e_slot >= 0 ? h->slot(e.e_slot, il) : nullptr;
        fgdilp::tr_edit_row(out, delta, ev, h->p.n_head, h->p.head_dim, h->p.exp_norm, h->p.exp_sim,
                            scale, h->p.renorm);
    }
    const size_t row_bytes = t->nb[1];
    for (size_t k = 0; k < h->edits.size(); ++k) {
        if (!h->out_ok[k]) {
            continue;
        }
        const int32_t r = h->edits[k].target_row;
        const float * out = h->out_buf.data() + k * width;
        if (host) {
            std::memcpy((char *) t->data + (size_t) r * row_bytes, out, sizeof(float) * width);
        } else {
            ggml_backend_tensor_set(t, out, (size_t) r * row_bytes, sizeof(float) * width);
        }
        h->n_edits_applied++;
    }
}

extern "C" bool fgdilp_hook_eval_callback(struct ggml_tensor * t, bool ask, void * user_data) {
    fgdilp_hook * h = (fgdilp_hook *) user_data;
    if (h == nullptr || t == nullptr || (h->captures.empty() && h->edits.empty())) {
        return !ask; // ask for nothing; never cancel a split
    }
    const int il = kqv_layer(t->name);
    if (ask) {
        return il >= 0;
    }
    if (il >= 0) {
        on_layer(h, t, il);
    }
    return true;
}
