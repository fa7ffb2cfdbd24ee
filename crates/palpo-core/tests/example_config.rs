//! `config/palpo.example.toml` stays true: it loads, its settings are the defaults, its
//! commented-out examples are valid, and it documents every key of the config structs (found by
//! reading `src/config.rs`, so a new field without documentation fails here).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use palpo_core::Config;

const EXAMPLE: &str = include_str!("../../../config/palpo.example.toml");
const CONFIG_SOURCE: &str = include_str!("../src/config.rs");

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/palpo.example.toml")
}

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn load_text(text: &str) -> Result<Config, palpo_core::ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("palpo.toml");
    std::fs::write(&path, text).expect("write");
    Config::load_from(Some(&path), no_env())
}

/// The example with every `# key = value` line turned into a setting.
fn uncommented() -> String {
    EXAMPLE
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if is_setting(rest) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_setting(line: &str) -> bool {
    line.split_once(" = ").is_some_and(|(key, _)| {
        !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    })
}

/// `struct name → [(field, type)]` for every `pub struct` with named fields in config.rs.
fn struct_fields() -> BTreeMap<String, Vec<(String, String)>> {
    let mut structs = BTreeMap::new();
    let mut current: Option<(String, Vec<(String, String)>)> = None;
    for line in CONFIG_SOURCE.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("pub struct ") {
            if let Some(name) = rest.strip_suffix('{') {
                current = Some((name.trim().to_owned(), Vec::new()));
            }
            continue;
        }
        let Some((name, fields)) = current.as_mut() else {
            continue;
        };
        if line == "}" {
            structs.insert(name.clone(), std::mem::take(fields));
            current = None;
        } else if let Some((field, ty)) = line.strip_prefix("pub ").and_then(|f| f.split_once(':'))
        {
            fields.push((
                field.trim().to_owned(),
                ty.trim().trim_end_matches(',').to_owned(),
            ));
        }
    }
    structs
}

/// Every leaf key of `Config` as a dotted path, e.g. `rate_limit.login.burst`.
fn config_keys() -> Vec<String> {
    fn walk(
        structs: &BTreeMap<String, Vec<(String, String)>>,
        name: &str,
        prefix: &str,
        out: &mut Vec<String>,
    ) {
        for (field, ty) in &structs[name] {
            let path = format!("{prefix}{field}");
            let inner = ty
                .strip_prefix("Option<")
                .and_then(|t| t.strip_suffix('>'))
                .unwrap_or(ty);
            if structs.contains_key(inner) {
                walk(structs, inner, &format!("{path}."), out);
            } else {
                out.push(path);
            }
        }
    }
    let structs = struct_fields();
    let mut keys = Vec::new();
    walk(&structs, "Config", "", &mut keys);
    keys
}

fn lookup<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

#[test]
fn example_loads_and_its_settings_are_the_defaults() {
    let example = Config::load_from(Some(&example_path()), no_env()).expect("the example loads");
    let defaults = load_text("").expect("the defaults load");
    assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
}

#[test]
fn commented_out_examples_are_valid() {
    let config = load_text(&uncommented()).expect("the example with every key set loads");
    assert!(config.cache.redis_url.is_some());
    assert!(config.registration.token.is_some());
    assert!(config.public_base_url.is_some());
    assert!(config.well_known.client.is_some() && config.well_known.server.is_some());
}

#[test]
fn every_config_key_is_documented_with_its_environment_variable() {
    let keys = config_keys();
    assert!(
        keys.len() >= 20 && keys.iter().any(|k| k == "rate_limit.login.per_second"),
        "reading config.rs went wrong: {keys:?}"
    );
    let table: toml::Table = toml::from_str(&uncommented()).expect("the example is TOML");
    let mut missing = Vec::new();
    for key in &keys {
        if lookup(&table, key).is_none() {
            missing.push(format!("{key} (no `{key} = ...` line, commented or not)"));
        }
        let env = format!("PALPO__{}", key.to_uppercase().replace('.', "__"));
        if !EXAMPLE.contains(&env) {
            missing.push(format!("{key} (environment variable {env} not mentioned)"));
        }
    }
    assert!(
        missing.is_empty(),
        "config/palpo.example.toml lacks: {missing:#?}"
    );
}
