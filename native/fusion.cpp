// fusion.cpp - FGDILP fusion of sub-toxicity vectors; mirrors fgdilp_cpp/method/fusion.py.
//
// deltas [n][width] -> one row [width]: mask each to its top-K % by |value|, elect a sign per
// coordinate, merge the entries that agree with it (max / mean / sum). The loops keep the numpy
// reference's order of float64 sums, so both give the same bits on the same input.
#include "fgdilp.h"
#include "internal.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <vector>

namespace fgdilp {

bool fusion_params_ok(const fgdilp_fusion_params & p) {
    return p.k_pct > 0.0f && p.k_pct <= 100.0f && // false for NaN
           (p.mode == FGDILP_FUSION_MAX || p.mode == FGDILP_FUSION_MEAN || p.mode == FGDILP_FUSION_SUM) &&
           p.norm_heads >= 0;
}

void rescale_to_mean_delta(const float * deltas, int n, int width, int n_heads, float * fused) {
    const int head_dim = width / n_heads;
    for (int h = 0; h < n_heads; ++h) {
        float * fh = fused + (size_t) h * head_dim;
        double target2 = 0.0, fused2 = 0.0; // left to right, like numpy's cumsum in method/fusion.py
        for (int i = 0; i < head_dim; ++i) {
            const size_t c = (size_t) h * head_dim + i;
            double total = 0.0; // mean over j of delta_j[c], summed in j order
            for (int j = 0; j < n; ++j) {
                total += (double) deltas[(size_t) j * width + c];
            }
            const double mean = total / (double) n;
            target2 += mean * mean;
            fused2  += (double) fh[i] * (double) fh[i];
        }
        // a zero mean delta asks for no edit of this head; a zero fused head stays zero
        const double r = (target2 > 0.0 && fused2 > 0.0) ? std::sqrt(target2) / std::sqrt(fused2) : 0.0;
        for (int i = 0; i < head_dim; ++i) {
            fh[i] = (float) ((double) fh[i] * r) + 0.0f; // + 0 turns -0 into +0, like the numpy
        }
    }
}

int keep_count(int width, float k_pct) {
    const double k = std::ceil((double) k_pct * (double) width / 100.0);
    return k < 1.0 ? 1 : (k > (double) width ? width : (int) k);
}

void mask_top_k(const float * delta, int width, float k_pct, float * out, float * scratch) {
    const int n_keep = keep_count(width, k_pct);
    if (n_keep == width) { // K = 100 (or a tiny row): everything is kept
        std::memcpy(out, delta, sizeof(float) * width);
        return;
    }
    for (int i = 0; i < width; ++i) {
        scratch[i] = std::fabs(delta[i]);
    }
    // thr = the n_keep-th largest |value| = element width - n_keep in increasing order
    std::nth_element(scratch, scratch + (width - n_keep), scratch + width);
    const float thr = scratch[width - n_keep];
    int n_above = 0;
    for (int i = 0; i < width; ++i) {
        n_above += std::fabs(delta[i]) > thr;
    }
    int ties_left = n_keep - n_above; // entries equal to thr still kept, lowest index first
    for (int i = 0; i < width; ++i) {
        const float a = std::fabs(delta[i]);
        if (a > thr) {
            out[i] = delta[i];
        } else if (a == thr && ties_left > 0) {
            out[i] = delta[i];
            --ties_left;
        } else {
            out[i] = 0.0f;
        }
    }
}

void elect_signs(const float * masked, int n, int width, int8_t * signs) {
    double norm2[FGDILP_MAX_NEG];
    for (int j = 0; j < n; ++j) {
        const float * m = masked + (size_t) j * width;
        double s = 0.0;
        for (int c = 0; c < width; ++c) {
            s += (double) m[c] * (double) m[c];
        }
        norm2[j] = s;
    }
    int64_t sum_signs = 0;
    for (int c = 0; c < width; ++c) {
        double w = 0.0; // sum over j in order, a zero vector contributes nothing
        for (int j = 0; j < n; ++j) {
            if (norm2[j] > 0.0) {
                const double v = (double) masked[(size_t) j * width + c];
                const double t = v * v / norm2[j];
                w += v > 0.0 ? t : (v < 0.0 ? -t : 0.0);
            }
        }
        const int8_t s = w > 0.0 ? 1 : (w < 0.0 ? -1 : 0);
        signs[c] = s;
        sum_signs += s;
    }
    const int8_t majority = sum_signs >= 0 ? 1 : -1;
    for (int c = 0; c < width; ++c) {
        if (signs[c] == 0) {
            signs[c] = majority;
        }
    }
}

int32_t fuse(const float * deltas, int n, int width, const fgdilp_fusion_params & params, float * out,
             const fusion_scratch & scratch) {
    if (!all_finite(deltas, (size_t) n * width)) {
        return FGDILP_ERR_NONFINITE;
    }
    float * masked = scratch.masked;
    for (int j = 0; j < n; ++j) {
        mask_top_k(deltas + (size_t) j * width, width, params.k_pct, masked + (size_t) j * width, scratch.abs);
    }
    const bool elect = params.elect;
    if (elect) {
        elect_signs(masked, n, width, scratch.signs);
    }
    for (int c = 0; c < width; ++c) {
        const int8_t sc = elect ? scratch.signs[c] : 0;
        float  best_abs = 0.0f; // max: largest agreeing |m_j[c]|
        float  best     = 0.0f; //      and its value (first j on ties)
        double total    = 0.0;  // mean / sum, in j order
        int    count    = 0;    // |A_c|
        for (int j = 0; j < n; ++j) {
            const float v = masked[(size_t) j * width + c];
            if (v == 0.0f || (elect && (v > 0.0f ? 1 : -1) != sc)) {
                continue; // not in A_c
            }
            const float a = std::fabs(v);
            if (a > best_abs) {
                best_abs = a;
                best     = v;
            }
            total += (double) v;
            ++count;
        }
        switch (params.mode) {
            case FGDILP_FUSION_MAX:
                out[c] = count == 0 ? 0.0f : (elect ? (float) sc * best_abs : best);
                break;
            case FGDILP_FUSION_MEAN:
                out[c] = count == 0 ? 0.0f : (float) (total / (double) count);
                break;
            default: // FGDILP_FUSION_SUM
                out[c] = (float) total;
                break;
        }
    }
    if (params.norm_heads > 0) {
        rescale_to_mean_delta(deltas, n, width, params.norm_heads, out);
    }
    return FGDILP_OK;
}

} // namespace fgdilp

extern "C" {

struct fgdilp_fusion_params fgdilp_fusion_default_params(void) {
    fgdilp_fusion_params p;
    p.k_pct = 50.0f;
    p.mode  = FGDILP_FUSION_MAX;
    p.elect = true;
    p.norm_heads = 0;
    return p;
}

int32_t fgdilp_fuse(const float * deltas, int32_t n, int32_t width,
                    const struct fgdilp_fusion_params * params, float * out) {
    if (deltas == nullptr || params == nullptr || out == nullptr || n < 1 || n > FGDILP_MAX_NEG ||
        width < 1 || !fgdilp::fusion_params_ok(*params) ||
        (params->norm_heads > 0 && width % params->norm_heads != 0)) {
        return FGDILP_ERR_ARG;
    }
    if (!fgdilp::all_finite(deltas, (size_t) n * width)) {
        return FGDILP_ERR_NONFINITE;
    }
    try {
        std::vector<float>  masked((size_t) n * width), abs((size_t) width), fused((size_t) width);
        std::vector<int8_t> signs((size_t) width);
        const fgdilp::fusion_scratch scratch = {masked.data(), abs.data(), signs.data()};
        const int32_t rc = fgdilp::fuse(deltas, n, width, *params, fused.data(), scratch);
        if (rc == FGDILP_OK) {
            std::memcpy(out, fused.data(), sizeof(float) * width); // out may alias deltas
        }
        return rc;
    } catch (const std::bad_alloc &) {
        return FGDILP_ERR_ALLOC;
    }
}

} // extern "C"
