//! Writes one YAML file per CRD into the chart (`charts/stash/crds/` by default), removing
//! files of CRDs that no longer exist, so the directory always equals the types.

use std::path::PathBuf;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "charts/stash/crds".to_owned()),
    );
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut written = Vec::new();
    for crd in stash_api::crds() {
        let name = stash_api::crd_file_name(&crd);
        let path = dir.join(&name);
        let yaml = stash_api::crd_yaml(&crd).with_context(|| format!("failed to render {name}"))?;
        std::fs::write(&path, yaml)
            .with_context(|| format!("failed to write {}", path.display()))?;
        written.push(name);
    }
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("failed to list {}", dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && !written.contains(&name) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("failed to remove stale {name}"))?;
            println!("removed {name}");
        }
    }
    println!("wrote {} CRDs to {}", written.len(), dir.display());
    Ok(())
}
