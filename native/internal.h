// internal.h - helpers shared by the native sources (not part of the C API).
#pragma once

#include <cstddef>

namespace fgdilp {

// TR edit of one layer row in place (see fgdilp_tr_edit_row).
void tr_edit_row(float * v, const float * delta, const float * e, int n_head, int head_dim,
                 float exp_norm, float exp_sim, float scale, bool renorm);

// True when no element is NaN or inf.
bool all_finite(const float * x, size_t n);

} // namespace fgdilp
