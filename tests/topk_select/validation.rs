//! Bad arguments: errors naming the argument, never a panic.

use kdfuse::topk_select::{select_cpu, select_oracle, SelectSpec, Selection, MAX_K};
use kdfuse::{HostData, KdError, Logits, Result};

type Select = fn(&Logits, &SelectSpec) -> Result<Selection>;
const BACKENDS: &[(&str, Select)] = &[("oracle", select_oracle), ("cpu", select_cpu)];

fn arg_of(r: Result<Selection>) -> (&'static str, String) {
    match r {
        Err(KdError::InvalidArgument { arg, msg }) => (arg, msg),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn k_out_of_range() {
    let x = vec![0f32; 5000];
    let l = Logits::new(HostData::F32(&x), 1, 5000);
    let short = Logits::new(HostData::F32(&x[..3]), 1, 3);
    for (name, f) in BACKENDS {
        for (l, k) in [(&l, 0), (&short, 4), (&l, MAX_K + 1)] {
            let (arg, msg) = arg_of(f(l, &SelectSpec { k, with_lse: false }));
            assert_eq!(arg, "k", "{name} k = {k}: {msg}");
        }
    }
}

#[test]
fn bad_shapes_name_logits() {
    let x = vec![0f32; 10];
    for (name, f) in BACKENDS {
        for l in [
            Logits::new(HostData::F32(&x), 1, 0),
            Logits::new(HostData::F32(&x), 3, 4),
            Logits::strided(HostData::F32(&x), 2, 4, 3),
        ] {
            let (arg, msg) = arg_of(f(
                &l,
                &SelectSpec {
                    k: 1,
                    with_lse: true,
                },
            ));
            assert_eq!(arg, "logits", "{name}: {msg}");
        }
    }
}

#[test]
fn nan_names_the_first_row() {
    let mut x = vec![1f32; 4 * 300];
    x[2 * 300 + 299] = f32::NAN;
    x[3 * 300] = f32::NAN;
    let l = Logits::new(HostData::F32(&x), 4, 300);
    for (name, f) in BACKENDS {
        for with_lse in [false, true] {
            let (arg, msg) = arg_of(f(&l, &SelectSpec { k: 3, with_lse }));
            assert_eq!(arg, "logits", "{name}");
            assert!(msg.contains("row 2 "), "{name}: {msg}");
        }
    }
}

#[test]
fn empty_batch() {
    let l = Logits::new(HostData::F32(&[]), 0, 7);
    for (name, f) in BACKENDS {
        let s = f(
            &l,
            &SelectSpec {
                k: 7,
                with_lse: true,
            },
        )
        .unwrap();
        assert_eq!(
            (s.rows, s.indices.len(), s.lse.unwrap().len()),
            (0, 0, 0),
            "{name}"
        );
    }
}
