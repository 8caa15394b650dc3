// edit.cpp - the Toxification-Reversal edit of one layer row; mirrors fgdilp_cpp/method/steering.py.
#include "fgdilp.h"
#include "internal.h"

#include <cmath>
#include <cstdint>

namespace fgdilp {

static double dot(const float * a, const float * b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; ++i) {
        s += (double) a[i] * (double) b[i];
    }
    return s;
}

// v [n_head*head_dim] edited in place; delta and e have the same layout; e may be null.
void tr_edit_row(float * v, const float * delta, const float * e, int n_head, int head_dim,
                 float exp_norm, float exp_sim, float scale, bool renorm) {
    const size_t width = (size_t) n_head * (size_t) head_dim;
    const double norm_before = std::sqrt(dot(v, v, width));
    for (int h = 0; h < n_head; ++h) {
        float *       vh = v + (size_t) h * head_dim;
        const float * dh = delta + (size_t) h * head_dim;
        const double lambda_norm = std::pow(1.0 + std::sqrt(dot(dh, dh, head_dim)), (double) exp_norm);
        double lambda_sim = 1.0;
        if (e != nullptr) {
            const float * eh = e + (size_t) h * head_dim;
            const double nv = std::sqrt(dot(vh, vh, head_dim));
            const double ne = std::sqrt(dot(eh, eh, head_dim));
            const double cos = (nv > 0.0 && ne > 0.0) ? dot(vh, eh, head_dim) / (nv * ne) : 0.0;
            lambda_sim = std::pow(1.0 + (cos > 0.0 ? cos : 0.0), (double) exp_sim);
        }
        const double k = (double) scale * lambda_norm * lambda_sim;
        for (int i = 0; i < head_dim; ++i) {
            vh[i] = (float) ((double) vh[i] - k * (double) dh[i]);
        }
    }
    if (renorm) {
        const double norm_after = std::sqrt(dot(v, v, width));
        if (norm_after > 0.0) {
            const double r = norm_before / norm_after;
            for (size_t i = 0; i < width; ++i) {
                v[i] = (float) ((double) v[i] * r);
            }
        }
    }
}

bool all_finite(const float * x, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        if (!std::isfinite(x[i])) {
            return false;
        }
    }
    return true;
}

} // namespace fgdilp

extern "C" int32_t fgdilp_tr_edit_row(float * v, const float * delta, const float * e,
                                      int32_t n_head, int32_t head_dim,
                                      float exp_norm, float exp_sim, float scale, bool renorm) {
    if (v == nullptr || delta == nullptr || n_head <= 0 || head_dim <= 0 ||
        (int64_t) n_head * (int64_t) head_dim > INT32_MAX) {
        return FGDILP_ERR_ARG;
    }
    fgdilp::tr_edit_row(v, delta, e, n_head, head_dim, exp_norm, exp_sim, scale, renorm);
    return FGDILP_OK;
}
