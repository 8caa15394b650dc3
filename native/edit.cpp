// edit.cpp - the edit of one steered layer row (TR or rotate, gated, per-head strengths); mirrors
// fgdilp_cpp/method/steering.py.
#include "fgdilp.h"
#include "internal.h"

#include <cmath>
#include <cstdint>
#include <new>
#include <vector>

namespace fgdilp {

static double dot(const float * a, const float * b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; ++i) {
        s += (double) a[i] * (double) b[i];
    }
    return s;
}

bool edit_rule_ok(int32_t rule) {
    return rule == FGDILP_EDIT_TR || rule == FGDILP_EDIT_ROTATE;
}

// v [n_head*head_dim] edited in place; delta and e have the same layout; e may be null.
// A head is left bit for bit as it is when its strength is 0 (scale or head scale) or the gate is
// shut; TR's renormalisation rescales the edited heads only, together, to their norm before the
// edit (with every head edited: the whole row, docs/method.md §2.3). The sums run left to right
// over the heads in order, so with every head edited the arithmetic is that of the plain TR edit.
int edit_row(float * v, const float * delta, const float * e, const float * head_scales, int n_head,
             int head_dim, const fgdilp_edit_params & q, uint8_t * edited) {
    const bool rotate = q.rule == FGDILP_EDIT_ROTATE;
    double before = 0.0, after = 0.0; // TR: squared norm of the edited heads before / after the edit
    int n_edited = 0;
    for (int h = 0; h < n_head; ++h) {
        float *       vh = v + (size_t) h * head_dim;
        const float * dh = delta + (size_t) h * head_dim;
        edited[h] = 0;
        const double k0 = (double) q.scale * (head_scales != nullptr ? (double) head_scales[h] : 1.0);
        if (k0 == 0.0) {
            continue;
        }
        const double nv = std::sqrt(dot(vh, vh, head_dim));
        const double nd = std::sqrt(dot(dh, dh, head_dim));
        if (q.gated) {
            const double cos = (nv > 0.0 && nd > 0.0) ? dot(vh, dh, head_dim) / (nv * nd) : 0.0;
            if (!(cos > (double) q.gate)) {
                continue;
            }
        }
        const double lambda_norm = std::pow(1.0 + nd, (double) q.exp_norm);
        double lambda_sim = 1.0;
        if (e != nullptr) {
            const float * eh = e + (size_t) h * head_dim;
            const double ne = std::sqrt(dot(eh, eh, head_dim));
            const double cos = (nv > 0.0 && ne > 0.0) ? dot(vh, eh, head_dim) / (nv * ne) : 0.0;
            lambda_sim = std::pow(1.0 + (cos > 0.0 ? cos : 0.0), (double) q.exp_sim);
        }
        const double k = k0 * lambda_norm * lambda_sim;
        if (rotate) {
            // |v_h| * unit(unit(v_h) - k unit(delta_h)); undefined (left as is) for a zero v_h or
            // delta_h, or where unit(v_h) = k unit(delta_h) exactly
            if (nv == 0.0 || nd == 0.0) {
                continue;
            }
            double nu2 = 0.0;
            for (int i = 0; i < head_dim; ++i) {
                const double u = (double) vh[i] / nv - k * (double) dh[i] / nd;
                nu2 += u * u;
            }
            if (!(nu2 > 0.0)) {
                continue;
            }
            const double r = nv / std::sqrt(nu2);
            for (int i = 0; i < head_dim; ++i) {
                vh[i] = (float) (((double) vh[i] / nv - k * (double) dh[i] / nd) * r);
            }
        } else {
            for (int i = 0; i < head_dim; ++i) {
                before += (double) vh[i] * (double) vh[i];
            }
            for (int i = 0; i < head_dim; ++i) {
                vh[i] = (float) ((double) vh[i] - k * (double) dh[i]);
            }
            for (int i = 0; i < head_dim; ++i) {
                after += (double) vh[i] * (double) vh[i];
            }
        }
        edited[h] = 1;
        ++n_edited;
    }
    if (!rotate && q.renorm && after > 0.0) {
        const double r = std::sqrt(before) / std::sqrt(after);
        for (int h = 0; h < n_head; ++h) {
            if (edited[h]) {
                float * vh = v + (size_t) h * head_dim;
                for (int i = 0; i < head_dim; ++i) {
                    vh[i] = (float) ((double) vh[i] * r);
                }
            }
        }
    }
    return n_edited;
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

extern "C" {

struct fgdilp_edit_params fgdilp_edit_default_params(void) {
    fgdilp_edit_params p;
    p.rule     = FGDILP_EDIT_TR;
    p.exp_norm = 0.4f;
    p.exp_sim  = 0.6f;
    p.scale    = 1.0f;
    p.renorm   = true;
    p.gated    = false;
    p.gate     = 0.0f;
    return p;
}

int32_t fgdilp_edit_row(float * v, const float * delta, const float * e, const float * head_scales,
                        int32_t n_head, int32_t head_dim, const struct fgdilp_edit_params * params) {
    if (v == nullptr || delta == nullptr || params == nullptr || n_head <= 0 || head_dim <= 0 ||
        (int64_t) n_head * (int64_t) head_dim > INT32_MAX || !fgdilp::edit_rule_ok(params->rule)) {
        return FGDILP_ERR_ARG;
    }
    try {
        std::vector<uint8_t> edited((size_t) n_head);
        return fgdilp::edit_row(v, delta, e, head_scales, n_head, head_dim, *params, edited.data());
    } catch (const std::bad_alloc &) {
        return FGDILP_ERR_ALLOC;
    }
}

int32_t fgdilp_tr_edit_row(float * v, const float * delta, const float * e,
                           int32_t n_head, int32_t head_dim,
                           float exp_norm, float exp_sim, float scale, bool renorm) {
    fgdilp_edit_params p = fgdilp_edit_default_params();
    p.exp_norm = exp_norm;
    p.exp_sim  = exp_sim;
    p.scale    = scale;
    p.renorm   = renorm;
    const int32_t rc = fgdilp_edit_row(v, delta, e, nullptr, n_head, head_dim, &p);
    return rc < 0 ? rc : FGDILP_OK;
}

} // extern "C"
