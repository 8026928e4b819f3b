//! linalg — small dense linear algebra on `f64` subspace bases (nalgebra).
//!
//! A subspace of R^d is carried as a basis matrix `d × r` whose columns span it. The functions here
//! orthonormalise such a basis (QR), compare two subspaces (projector distance, principal angles)
//! and find the dominant directions of a symmetric matrix or of a stack of direction rows (PCA).
//! They are shared by the `theory` experiment and by anything else that builds a basis.

use nalgebra::{DMatrix, SymmetricEigen};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum LinalgError {
    /// Two bases that must live in the same R^d do not.
    #[error("{what}: ambient dimensions differ ({left} vs {right})")]
    DimMismatch {
        what: &'static str,
        left: usize,
        right: usize,
    },
    /// The input does not span as many dimensions as were asked for.
    #[error("{what}: rank {got} is below the {expected} required (relative tolerance {tol:e})")]
    RankDeficient {
        what: &'static str,
        expected: usize,
        got: usize,
        tol: f64,
    },
    /// More directions were requested than the space or the input holds.
    #[error("{what}: asked for {requested} directions, only {available} available")]
    TooManyDirections {
        what: &'static str,
        requested: usize,
        available: usize,
    },
    #[error("{what}: matrix is {rows}×{cols}, expected square")]
    NotSquare {
        what: &'static str,
        rows: usize,
        cols: usize,
    },
    #[error("{what}: contains a non-finite entry")]
    NonFinite { what: &'static str },
}

/// Relative tolerance on |R_ii| (against the largest) below which a column counts as dependent.
pub const RANK_TOL: f64 = 1e-10;

fn check_finite(what: &'static str, m: &DMatrix<f64>) -> Result<(), LinalgError> {
    if m.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(LinalgError::NonFinite { what })
    }
}

/// Orthonormal basis (`d × r`, thin Householder QR) of the span of the columns of `a` (`d × r`).
///
/// Fails with `RankDeficient` when a column is (numerically) a combination of the earlier ones:
/// a subspace estimate that silently loses a dimension would make its error look like a floor.
pub fn orthonormalize(what: &'static str, a: &DMatrix<f64>) -> Result<DMatrix<f64>, LinalgError> {
    check_finite(what, a)?;
    let (d, r) = a.shape();
    if r > d {
        return Err(LinalgError::TooManyDirections {
            what,
            requested: r,
            available: d,
        });
    }
    if r == 0 {
        return Ok(DMatrix::zeros(d, 0));
    }
    let qr = a.clone().qr();
    let rr = qr.r(); // (r, r), upper triangular
    let diag: Vec<f64> = (0..r).map(|i| rr[(i, i)].abs()).collect();
    let largest = diag.iter().cloned().fold(0.0, f64::max);
    let got = diag.iter().filter(|v| **v > RANK_TOL * largest).count();
    if largest == 0.0 || got < r {
        return Err(LinalgError::RankDeficient {
            what,
            expected: r,
            got: if largest == 0.0 { 0 } else { got },
            tol: RANK_TOL,
        });
    }
    Ok(qr.q()) // (d, r)
}

/// The orthogonal projector `U Uᵀ` (`d × d`) onto the span of an orthonormal basis `u` (`d × r`).
pub fn projector(u: &DMatrix<f64>) -> DMatrix<f64> {
    u * u.transpose()
}

/// Recovery error ‖P_A − P_B‖_F between the subspaces spanned by orthonormal bases `a` and `b`.
///
/// For equal ranks r it equals `sqrt(2 Σ sin²θ_i)` over the principal angles θ_i, so it runs from
/// 0 (same subspace) to √(2r) (orthogonal subspaces). For ranks r_a ≠ r_b it is at least
/// √|r_a − r_b|: a single direction inside an r-dimensional subspace is √(r − 1) away from it.
pub fn projector_distance(a: &DMatrix<f64>, b: &DMatrix<f64>) -> Result<f64, LinalgError> {
    if a.nrows() != b.nrows() {
        return Err(LinalgError::DimMismatch {
            what: "projector distance",
            left: a.nrows(),
            right: b.nrows(),
        });
    }
    Ok((projector(a) - projector(b)).norm())
}

/// Principal angles (radians, ascending) between the spans of orthonormal bases `a` and `b`.
///
/// cos θ_i are the singular values of `aᵀ b` (`r_a × r_b`), clamped to [0, 1] against rounding;
/// there are min(r_a, r_b) of them.
pub fn principal_angles(a: &DMatrix<f64>, b: &DMatrix<f64>) -> Result<Vec<f64>, LinalgError> {
    if a.nrows() != b.nrows() {
        return Err(LinalgError::DimMismatch {
            what: "principal angles",
            left: a.nrows(),
            right: b.nrows(),
        });
    }
    let m = a.transpose() * b; // (r_a, r_b)
    if m.nrows() == 0 || m.ncols() == 0 {
        return Ok(Vec::new());
    }
    let svd = m.svd(false, false);
    let mut angles: Vec<f64> = svd
        .singular_values
        .iter()
        .map(|s| s.clamp(0.0, 1.0).acos())
        .collect();
    angles.sort_by(f64::total_cmp);
    Ok(angles)
}

/// The `r` eigenvectors of the symmetric matrix `m` (`d × d`) with the largest eigenvalues, as the
/// columns of a `d × r` matrix, and those eigenvalues (descending).
pub fn top_eigenvectors(
    what: &'static str,
    m: &DMatrix<f64>,
    r: usize,
) -> Result<(DMatrix<f64>, Vec<f64>), LinalgError> {
    check_finite(what, m)?;
    let (rows, cols) = m.shape();
    if rows != cols {
        return Err(LinalgError::NotSquare { what, rows, cols });
    }
    if r > rows {
        return Err(LinalgError::TooManyDirections {
            what,
            requested: r,
            available: rows,
        });
    }
    let eig = SymmetricEigen::new(m.clone());
    let mut order: Vec<usize> = (0..rows).collect();
    order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
    let mut basis = DMatrix::zeros(rows, r);
    let mut values = Vec::with_capacity(r);
    for (col, &i) in order.iter().take(r).enumerate() {
        basis.set_column(col, &eig.eigenvectors.column(i));
        values.push(eig.eigenvalues[i]);
    }
    Ok((basis, values))
}

/// Uncentred PCA of direction rows: the top-`r` right singular directions of `rows` (`k × d`), as an
/// orthonormal `d × r` basis, with the share of the rows' energy (Σ σ²) each direction holds.
///
/// This is how a set of decoder directions becomes an r-dimensional subspace. Fails when the rows
/// span fewer than `r` dimensions.
pub fn top_row_directions(
    what: &'static str,
    rows: &DMatrix<f64>,
    r: usize,
) -> Result<(DMatrix<f64>, Vec<f64>), LinalgError> {
    check_finite(what, rows)?;
    if r > rows.nrows() {
        return Err(LinalgError::TooManyDirections {
            what,
            requested: r,
            available: rows.nrows(),
        });
    }
    let gram = rows.transpose() * rows; // (d, d)
    let (basis, values) = top_eigenvectors(what, &gram, r)?;
    let total: f64 = gram.trace();
    let largest = values.first().copied().unwrap_or(0.0);
    let got = values.iter().filter(|v| **v > RANK_TOL * largest).count();
    if r > 0 && (largest <= 0.0 || got < r) {
        return Err(LinalgError::RankDeficient {
            what,
            expected: r,
            got: if largest <= 0.0 { 0 } else { got },
            tol: RANK_TOL,
        });
    }
    let shares = values
        .iter()
        .map(|v| if total > 0.0 { v / total } else { 0.0 })
        .collect();
    Ok((basis, shares))
}

/// `n` standard normal draws from a seeded generator (Box–Muller, both values of each pair used;
/// no distribution crate for one function).
pub fn standard_normals(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f64> {
    use rand::Rng;
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        out.push(radius * angle.cos());
        out.push(radius * angle.sin());
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(d: usize, idx: &[usize]) -> DMatrix<f64> {
        let mut m = DMatrix::zeros(d, idx.len());
        for (c, &i) in idx.iter().enumerate() {
            m[(i, c)] = 1.0;
        }
        m
    }

    #[test]
    fn orthonormalize_spans_the_same_space_with_orthonormal_columns() {
        let a = DMatrix::from_row_slice(3, 2, &[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
        let q = orthonormalize("test", &a).unwrap();
        let gram = q.transpose() * &q;
        assert!((gram - DMatrix::<f64>::identity(2, 2)).norm() < 1e-12);
        // span{(1,0,0),(1,1,0)} is the x–y plane
        assert!(projector_distance(&q, &e(3, &[0, 1])).unwrap() < 1e-12);
    }

    #[test]
    fn orthonormalize_rejects_dependent_columns() {
        let a = DMatrix::from_row_slice(3, 2, &[1.0, 2.0, 1.0, 2.0, 0.0, 0.0]);
        let err = orthonormalize("test", &a).unwrap_err();
        assert!(matches!(
            err,
            LinalgError::RankDeficient {
                expected: 2,
                got: 1,
                ..
            }
        ));
    }

    #[test]
    fn single_direction_inside_r_dim_subspace_is_sqrt_r_minus_1_away() {
        // ‖P_1 − P_U‖² = 1 + r − 2·1 = r − 1 when the direction lies in U.
        let u = e(6, &[0, 1, 2, 3]);
        let one = e(6, &[2]);
        let got = projector_distance(&one, &u).unwrap();
        assert!((got - 3f64.sqrt()).abs() < 1e-12, "{got}");
    }

    #[test]
    fn top_row_directions_finds_the_dominant_plane() {
        // rows mostly in the x–y plane, a little z: top-2 directions are x and y.
        let rows = DMatrix::from_row_slice(3, 3, &[3.0, 0.0, 0.1, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0]);
        let (basis, shares) = top_row_directions("test", &rows, 2).unwrap();
        assert!(projector_distance(&basis, &e(3, &[0, 1])).unwrap() < 0.05);
        assert!(shares[0] >= shares[1] && shares.iter().sum::<f64>() < 1.0);
    }
}
