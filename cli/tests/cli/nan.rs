//! A fuzzing regression through the command line (issue 18): a NaN teacher
//! logit gives a NaN loss (JSON null, spelled in `nonfinite`) and NaN
//! gradient rows, never a number. The library-level cases are in the
//! library's tests/kd/nan_regressions.rs.

use crate::run::{read_f32, temp_paths, write, Cli};

/// `kdfuse loss` on a one-row batch with a NaN teacher logit.
#[test]
fn cli_loss_with_a_nan_teacher_is_nan() {
    let (_dir, [s, t, g]) = temp_paths(["s.npy", "t.npy", "g.npy"]);
    write(&s, &[1.0f32, 2.0, 0.5], &[1, 3]);
    write(&t, &[1.0f32, f32::NAN, 3.0], &[1, 3]);
    for backend in ["oracle", "cpu"] {
        for divergence in ["forward-kl", "soft-ce", "reverse-kl", "jsd", "tvd"] {
            let j = Cli::loss(&s, &t)
                .args(&["--divergence", divergence, "--backend", backend])
                .path("--grad", &g)
                .json();
            // A non-finite loss is JSON null, spelled in `nonfinite`.
            assert!(j["loss"].is_null(), "{backend} {divergence}: {j}");
            assert_eq!(j["nonfinite"]["loss"], "nan", "{backend} {divergence}: {j}");
            let (grad, _) = read_f32(&g);
            assert!(
                grad.iter().all(|x| x.is_nan()),
                "{backend} {divergence}: {grad:?}"
            );
        }
    }
}
