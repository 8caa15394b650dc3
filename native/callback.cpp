// callback.cpp - the eval callback: ask for kqv_out-<il>, check each node against the decode,
// capture planned rows, edit P0 rows (TR or rotate, gated, per-head strengths) in place (host buffers) or through copies (device buffers).
#include "fgdilp.h"
#include "internal.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

// Whether kqv_out can be read and written in place (CPU), or only through ggml_backend_tensor_get/set.
static bool is_host(const ggml_tensor * t) {
    if (fgdilp::force_device_path()) {
        return false;
    }
    return t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer);
}

static const char KQV_PREFIX[] = "kqv_out-";

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

// Validate the node and note that its layer fired; false (error recorded) when the hook must stop.
static bool check_tensor(fgdilp_hook * h, const ggml_tensor * t, int il) {
    char msg[320];
    if (h->n_tokens < 0) {
        std::snprintf(msg, sizeof msg, "%s fired in a planned decode without fgdilp_hook_begin", t->name);
        h->fail(FGDILP_ERR_ARG, msg);
        return false;
    }
    if (il >= h->p.n_layer) {
        std::snprintf(msg, sizeof msg, "%s: layer %d but the model has %d", t->name, il, h->p.n_layer);
        h->fail(FGDILP_ERR_TENSOR, msg);
        return false;
    }
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t) ||
        (t->op != GGML_OP_CONT && t->op != GGML_OP_RESHAPE) || t->ne[0] != (int64_t) h->width ||
        t->ne[2] != 1 || t->ne[3] != 1) {
        std::snprintf(msg, sizeof msg,
                      "%s is not the per-head attention output this hook expects "
                      "(type %s, op %s, ne [%lld, %lld, %lld, %lld], contiguous %d; expected F32 CONT/RESHAPE of width %zu)",
                      t->name, ggml_type_name(t->type), ggml_op_name(t->op), (long long) t->ne[0],
                      (long long) t->ne[1], (long long) t->ne[2], (long long) t->ne[3],
                      (int) ggml_is_contiguous(t), h->width);
        h->fail(FGDILP_ERR_TENSOR, msg);
        return false;
    }
    // row i is token i of the batch only when the whole batch is this one ubatch
    if (t->ne[1] != (int64_t) h->n_tokens) {
        std::snprintf(msg, sizeof msg, "%s has %lld rows but the decode has %d tokens (was the batch split "
                      "into several ubatches?)", t->name, (long long) t->ne[1], h->n_tokens);
        h->fail(FGDILP_ERR_ROW, msg);
        return false;
    }
    if (h->fired[il]) {
        std::snprintf(msg, sizeof msg, "%s fired twice in one decode", t->name);
        h->fail(FGDILP_ERR_REFIRED, msg);
        return false;
    }
    h->fired[il] = 1;
    h->n_fired++;
    return true;
}

// Device buffers: fetch the planned rows into their places in row_buf (one synchronous copy per row).
static void fetch_rows(fgdilp_hook * h, const ggml_tensor * t) {
    const size_t row_bytes = t->nb[1];
    const std::vector<int32_t> & rows = h->plan.rows;
    for (size_t i = 0; i < rows.size(); ++i) {
        ggml_backend_tensor_get(t, h->plan.row_buf.data() + i * h->width, (size_t) rows[i] * row_bytes, row_bytes);
    }
}

// Capture and edit the planned rows of one layer; false (error recorded) stops the decode.
static bool on_layer(fgdilp_hook * h, ggml_tensor * t, int il) {
    if (!check_tensor(h, t, il)) {
        return false;
    }
    fgdilp::plan_state & plan = h->plan;
    const size_t width = h->width;
    const bool host = is_host(t);
    if (!host) {
        fetch_rows(h, t);
    }
    // row r (at `place` in the plan's rows): in place on the host, else the fetched copy
    auto row = [&](int32_t r, int32_t place) -> const float * {
        return host ? (const float *) t->data + (size_t) r * width : plan.row_buf.data() + (size_t) place * width;
    };

    for (size_t i = 0; i < plan.captures.size(); ++i) {
        const fgdilp_capture & c = plan.captures[i];
        std::memcpy(h->slot(c.slot, il), row(c.row, plan.capture_place[i]), sizeof(float) * width);
    }

    const float scale = h->layer_scales[il];
    if (scale == 0.0f || plan.edits.empty()) {
        return true;
    }
    const fgdilp::fusion_scratch scratch = {h->fuse_masked.data(), h->fuse_abs.data(), h->fuse_signs.data()};
    fgdilp_edit_params rule = fgdilp_edit_default_params();
    rule.rule     = h->edit_rule;
    rule.exp_norm = h->p.exp_norm;
    rule.exp_sim  = h->p.exp_sim;
    rule.scale    = scale;
    rule.renorm   = h->p.renorm;
    rule.gated    = h->gated;
    rule.gate     = h->gate;
    char msg[320];
    // compute every edit before writing any, so an edit never reads another's output, and a
    // row that is not finite leaves the whole layer as the model computed it
    for (size_t k = 0; k < plan.edits.size(); ++k) {
        const fgdilp_edit & e = plan.edits[k];
        const fgdilp::edit_places & at = plan.edit_place[k];
        const float * delta;
        if (e.dir_slot >= 0) {
            delta = h->slot(e.dir_slot, il);
        } else {
            // sub-toxicity vectors delta_j = a(neg_j) - a(pos), then their fusion
            const float * pos = row(e.pos_row, at.pos);
            for (int j = 0; j < e.n_neg; ++j) {
                const float * neg = row(e.neg_rows[j], at.neg[j]);
                float * dj = h->deltas.data() + (size_t) j * width;
                for (size_t i = 0; i < width; ++i) {
                    dj[i] = neg[i] - pos[i];
                }
            }
            if (fgdilp::fuse(h->deltas.data(), e.n_neg, (int) width, h->fusion, h->delta.data(), scratch) != FGDILP_OK) {
                std::snprintf(msg, sizeof msg, "%s: NaN or inf in the rows of edit %zu (target row %d)",
                              t->name, k, e.target_row);
                h->fail(FGDILP_ERR_NONFINITE, msg);
                return false;
            }
            delta = h->delta.data();
        }
        float * out = plan.out_buf.data() + k * width;
        std::memcpy(out, row(e.target_row, at.target), sizeof(float) * width);
        const float * ev = e.e_slot >= 0 ? h->slot(e.e_slot, il) : nullptr;
        h->n_heads_edited += fgdilp::edit_row(out, delta, ev, h->head_scales.data() + (size_t) il * h->p.n_head,
                                              h->p.n_head, h->p.head_dim, rule, h->head_edited.data());
        // an overflow here would reach the logits as NaN: fail the decode instead
        if (!fgdilp::all_finite(out, width)) {
            std::snprintf(msg, sizeof msg, "%s: the steered row %d is not finite (NaN or inf): the steering "
                          "strength %g or the exponents (%g, %g) overflow, or the %s holds NaN or inf",
                          t->name, e.target_row, (double) scale, (double) h->p.exp_norm, (double) h->p.exp_sim,
                          e.dir_slot >= 0 ? "direction slot" : (e.e_slot >= 0 ? "e slot" : "row"));
            h->fail(FGDILP_ERR_NONFINITE, msg);
            return false;
        }
    }
    const size_t row_bytes = t->nb[1];
    for (size_t k = 0; k < plan.edits.size(); ++k) {
        const size_t r = (size_t) plan.edits[k].target_row;
        const float * out = plan.out_buf.data() + k * width;
        if (host) {
            std::memcpy((char *) t->data + r * row_bytes, out, sizeof(float) * width);
        } else {
            ggml_backend_tensor_set(t, out, r * row_bytes, sizeof(float) * width);
        }
        h->n_edits_applied++;
    }
    return true;
}

extern "C" bool fgdilp_hook_eval_callback(struct ggml_tensor * t, bool ask, void * user_data) {
    fgdilp_hook * h = (fgdilp_hook *) user_data;
    if (h == nullptr || t == nullptr || h->plan.empty()) {
        return !ask; // ask for nothing; never cancel a split
    }
    const int il = kqv_layer(t->name);
    if (ask) {
        return il >= 0 && h->status == FGDILP_OK; // after an error no node is looked at
    }
    return il < 0 || on_layer(h, t, il);
}
