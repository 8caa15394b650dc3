// fixture.h - what the native tests share: CHECK, synthetic kqv_out nodes, hooks and edits.
#pragma once

#include "fgdilp.h"
#include "internal.h"
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <vector>

extern int g_pass, g_fail; // defined in test_native.cpp
#define CHECK(cond)                                                          \
    do {                                                                     \
        if (cond) { ++g_pass; }                                              \
        else { ++g_fail; std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); } \
    } while (0)

inline constexpr int N_LAYER = 3, N_HEAD = 4, HEAD_DIM = 8, WIDTH = N_HEAD * HEAD_DIM, ROWS = 5;

// N_LAYER kqv_out nodes [width][ROWS] in a CPU backend buffer (so the device path can use it too)
struct fixture {
    ggml_context * ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    std::vector<ggml_tensor *> layers;
    fixture(ggml_type type = GGML_TYPE_F32, int width = WIDTH, ggml_op op = GGML_OP_CONT) {
        ggml_init_params ip = {64 * ggml_tensor_overhead(), nullptr, true};
        ctx = ggml_init(ip);
        for (int il = 0; il < N_LAYER; ++il) {
            ggml_tensor * t = ggml_new_tensor_2d(ctx, type, width, ROWS);
            ggml_format_name(t, "kqv_out-%d", il);
            t->op = op;
            layers.push_back(t);
        }
        buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_cpu_buffer_type());
        for (int il = 0; il < N_LAYER; ++il) {
            ggml_tensor * t = layers[il];
            if (type == GGML_TYPE_F32) {
                float * d = (float *) t->data;
                for (int i = 0; i < width * ROWS; ++i) {
                    d[i] = std::sin(0.37f * i + 1.3f * il) + 0.1f * (float) (i % 7);
                }
            }
        }
    }
    ~fixture() {
        ggml_backend_buffer_free(buf);
        ggml_free(ctx);
    }
    float * row(int il, int r) { return (float *) layers[il]->data + (size_t) r * WIDTH; }
    std::vector<float> copy() const {
        std::vector<float> out((size_t) N_LAYER * WIDTH * ROWS);
        for (int il = 0; il < N_LAYER; ++il) std::memcpy(&out[(size_t) il * WIDTH * ROWS], layers[il]->data, sizeof(float) * WIDTH * ROWS);
        return out;
    }
    // what the scheduler does: ask, then call for the asked node; a false answer stops the graph.
    // Returns whether every call answered true.
    bool run_layers(fgdilp_hook * h, std::initializer_list<int> order, int n_tokens = ROWS) {
        fgdilp_hook_begin(h, n_tokens);
        for (int il : order) {
            if (fgdilp_hook_eval_callback(layers[il], true, h) && !fgdilp_hook_eval_callback(layers[il], false, h)) {
                return false;
            }
        }
        return true;
    }
    bool run(fgdilp_hook * h, int n_layers = N_LAYER) {
        fgdilp_hook_begin(h, ROWS);
        for (int il = 0; il < n_layers; ++il) {
            if (fgdilp_hook_eval_callback(layers[il], true, h) && !fgdilp_hook_eval_callback(layers[il], false, h)) {
                return false;
            }
        }
        return true;
    }
};

inline fgdilp_hook * make_hook() {
    fgdilp_hook_params p = fgdilp_hook_default_params();
    p.n_layer = N_LAYER; p.n_head = N_HEAD; p.head_dim = HEAD_DIM; p.n_slots = 3;
    return fgdilp_hook_init(&p);
}

inline fgdilp_fusion_params fusion(float k_pct, int32_t mode, bool elect) {
    fgdilp_fusion_params f = fgdilp_fusion_default_params();
    f.k_pct = k_pct; f.mode = mode; f.elect = elect;
    return f;
}

// a hook that runs plain TR on one negative: K = 100 keeps the delta whole
inline fgdilp_hook * make_tr_hook() {
    fgdilp_hook * h = make_hook();
    const fgdilp_fusion_params f = fusion(100.0f, FGDILP_FUSION_MAX, true);
    CHECK(fgdilp_hook_set_fusion(h, &f) == FGDILP_OK);
    return h;
}

inline fgdilp_edit tr_edit(int target, int pos, int neg, int e_slot) {
    fgdilp_edit e;
    std::memset(&e, 0, sizeof e);
    e.target_row = target; e.pos_row = pos; e.neg_rows[0] = neg; e.n_neg = 1; e.dir_slot = -1; e.e_slot = e_slot;
    return e;
}

inline double norm(const float * x, int n) {
    double s = 0; for (int i = 0; i < n; ++i) s += (double) x[i] * x[i]; return std::sqrt(s);
}
