//! Embeds the three migration folders into the binary, so `palpo migrate` needs no files on disk.

use std::{fmt::Write, fs, path::PathBuf};

fn main() {
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("../..");
    let mut out = String::new();
    for backend in ["postgres", "mysql", "sqlite"] {
        let dir = root.join(format!("migrations-{backend}"));
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
            .collect();
        files.sort();
        writeln!(
            out,
            "pub const {}: &[(i64, &str, &str)] = &[",
            backend.to_uppercase()
        )
        .ok();
        for path in files {
            println!("cargo:rerun-if-changed={}", path.display());
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("utf-8 file name");
            let (version, description) = stem
                .split_once('_')
                .unwrap_or_else(|| panic!("migration {stem} is not named VERSION_description.sql"));
            let version: i64 = version
                .parse()
                .unwrap_or_else(|_| panic!("migration {stem}: version is not a number"));
            let abs = fs::canonicalize(&path).expect("migration path");
            writeln!(
                out,
                "    ({version}, {description:?}, include_str!({abs:?})),"
            )
            .ok();
        }
        writeln!(out, "];").ok();
    }
    let dest =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("migrations.rs");
    fs::write(dest, out).expect("write migrations.rs");
}
