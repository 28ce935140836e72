//! The training example's data loaders: the bundled digits and the MNIST IDX reader.

#[path = "../examples/train_digits/data.rs"]
#[allow(dead_code)]
mod data;

use std::io::Write;
use std::path::Path;

#[test]
fn bundled_digits_load_and_split_reproducibly() {
    let d = data::load_digits(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/digits/digits.csv.gz"
    )))
    .unwrap();
    assert_eq!((d.len(), d.features, d.classes), (1797, 64, 10));
    assert_eq!(d.x.len(), 1797 * 64);
    assert!(d.x.iter().all(|&v| (0.0..=1.0).contains(&v)));
    // First row of the file: 0,0,5,13,9,1,... label 0.
    assert_eq!((d.x[2], d.x[3], d.y[0]), (5.0 / 16.0, 13.0 / 16.0, 0));
    let mut counts = [0usize; 10];
    d.y.iter().for_each(|&c| counts[c as usize] += 1);
    assert!(
        counts.iter().all(|&c| (170..=185).contains(&c)),
        "{counts:?}"
    );
    let (tr, te) = d.split(0.8, 42);
    assert_eq!((tr.len(), te.len()), (1438, 359));
    let (tr2, te2) = d.split(0.8, 42);
    assert_eq!((tr.clone(), te.clone()), (tr2, te2));
    let (tr3, _) = d.split(0.8, 43);
    assert_ne!(tr.y, tr3.y);
}

#[test]
fn digits_csv_errors_name_the_line() {
    assert!(data::parse_digits_csv("")
        .unwrap_err()
        .contains("no images"));
    let row: String = (0..64).map(|_| "1,").collect::<String>() + "3";
    assert_eq!(data::parse_digits_csv(&row).unwrap().y, vec![3]);
    let e = data::parse_digits_csv(&format!("{row}\n1,2,3")).unwrap_err();
    assert!(e.contains("line 2") && e.contains("expected 65"), "{e}");
    let e = data::parse_digits_csv(&row.replacen('1', "17", 1)).unwrap_err();
    assert!(e.contains("outside 0..16"), "{e}");
    let e = data::parse_digits_csv(&row.replacen('1', "x", 1)).unwrap_err();
    assert!(e.contains("line 1"), "{e}");
}

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

#[test]
fn idx_reader_reads_small_files_the_test_writes() {
    let dir = std::env::temp_dir().join(format!("thor-idx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pixels: Vec<u8> = (0..3 * 2 * 2).map(|i| (i * 20) as u8).collect();
    std::fs::write(
        dir.join("train-images-idx3-ubyte"),
        idx(&[3, 2, 2], &pixels),
    )
    .unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx(&[3], &[7, 1, 4])).unwrap();
    // The test files gzipped, as MNIST is usually distributed.
    for (name, bytes) in [
        (
            "t10k-images-idx3-ubyte.gz",
            idx(&[1, 2, 2], &[255, 0, 51, 102]),
        ),
        ("t10k-labels-idx1-ubyte.gz", idx(&[1], &[2])),
    ] {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&bytes).unwrap();
        std::fs::write(dir.join(name), gz.finish().unwrap()).unwrap();
    }
    let (train, test) = data::load_mnist_dir(&dir).unwrap();
    assert_eq!((train.len(), train.features, train.classes), (3, 4, 8));
    assert_eq!(train.y, vec![7, 1, 4]);
    assert_eq!(train.x[1], 20.0 / 255.0);
    assert_eq!(test.x, vec![1.0, 0.0, 0.2, 0.4]);
    assert_eq!(test.y, vec![2]);
    // Broken files: clear errors.
    assert!(data::parse_idx_u8(&[1, 2, 3])
        .unwrap_err()
        .contains("magic"));
    assert!(data::parse_idx_u8(&idx(&[3, 2, 2], &pixels[..5]))
        .unwrap_err()
        .contains("need 12"));
    let mut float = idx(&[1], &[0, 0, 0, 0]);
    float[2] = 0x0d;
    assert!(data::parse_idx_u8(&float)
        .unwrap_err()
        .contains("element type"));
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx(&[2], &[7, 1])).unwrap();
    assert!(data::load_mnist_dir(&dir)
        .unwrap_err()
        .contains("do not pair up"));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(data::load_mnist_dir(&dir)
        .unwrap_err()
        .contains("no train-images"));
}
