//! `palpo openapi`: writes the OpenAPI documents of the HTTP API (what `openapi/` holds).

use std::path::Path;

use anyhow::Context;

pub fn write(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for (name, json) in palpo_api::openapi_documents() {
        let path = out.join(&name);
        std::fs::write(&path, json).with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}
