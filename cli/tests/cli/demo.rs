//! `kdfuse demo`'s claims, checked on the real runs: the default settings
//! (those of README's table), fixed seeds, on the CPU; and the digits
//! dataset they run on.

use kdfuse::distill::Device;
use kdfuse_cli::demo::{self, DemoConfig, DemoReport};
use kdfuse_cli::digits::Digits;

fn run(omit_class: Option<i64>) -> DemoReport {
    let cfg = DemoConfig {
        device: Device::Cpu,
        omit_class,
        ..Default::default()
    };
    demo::run(&cfg, &mut |_| {}).unwrap()
}

#[test]
fn distilled_student_beats_hard_label_student_on_the_mean_over_seeds() {
    let r = run(None);
    let (t, a, b) = (r.teacher(), r.hard(), r.distilled());
    eprintln!(
        "teacher {:.4}; hard {:?}; distilled {:?}; gain {:?}",
        t.test_acc.mean, a.test_acc_per_seed, b.test_acc_per_seed, r.gain
    );
    assert_eq!((r.train_images, r.test_images), (1300, 497));
    assert!(t.test_acc.mean > 0.97, "the teacher is good");
    assert!(t.params > 1000 * a.params, "and large");
    // The students learn: well above chance, below the teacher.
    assert!(a.test_acc.mean > 0.9 && a.test_acc.mean < t.test_acc.mean);
    assert!(
        b.test_acc.mean > a.test_acc.mean,
        "distillation helps on the mean"
    );
    assert!(r.gain.mean > 0.0);
    assert!(
        b.test_loss.mean < a.test_loss.mean,
        "and lowers the test cross-entropy"
    );
    assert_eq!(a.test_acc_per_seed.len(), 3);
    assert_eq!(a.curve.len(), DemoConfig::default().student_epochs);
}

#[test]
fn distilled_student_learns_a_class_it_never_saw() {
    let k = 3;
    let r = run(Some(k));
    let n = r.omitted_test_images.unwrap();
    let hard = r.hard().omitted_correct.clone().unwrap();
    let dist = r.distilled().omitted_correct.clone().unwrap();
    eprintln!("of {n} test images of {k}: hard {hard:?}, distilled {dist:?}");
    assert!(n > 30);
    assert!(r.student_train_images < r.train_images);
    // The hard-label student gets almost none (it never saw the class),
    assert!(hard.iter().all(|&c| c <= n / 20), "{hard:?} of {n}");
    // the distilled student a large share, through the teacher's soft labels.
    let mean = dist.iter().sum::<usize>() as f64 / dist.len() as f64;
    assert!(mean >= 0.5 * n as f64, "{dist:?} of {n}");
    assert!(dist.iter().all(|&c| c >= n / 4), "{dist:?} of {n}");
    assert!(r.teacher().omitted_correct.as_ref().unwrap()[0] as f64 > 0.9 * n as f64);
}

#[test]
fn digits_load_and_split() {
    let d = Digits::load();
    assert_eq!(d.len(), 1797);
    assert_eq!(d.x.len(), 1797 * 64);
    assert!(d.x.iter().all(|&v| (0.0..=1.0).contains(&v)));
    assert!(d.class_counts().iter().all(|&c| (170..=190).contains(&c)));
    let (a, b) = d.split(1300, 1).unwrap();
    let (a2, _) = d.split(1300, 1).unwrap();
    assert_eq!((a.len(), b.len()), (1300, 497));
    assert_eq!(a, a2);
    assert!(d.split(1797, 1).is_err());
    assert_eq!(a.without_class(3).class_counts()[3], 0);
}
