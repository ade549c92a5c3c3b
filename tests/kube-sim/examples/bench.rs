//! Prints the list/watch benchmark for 5,000 objects and 50 watchers:
//! `cargo run --release -p kube-sim --example bench`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    for _ in 0..3 {
        let r = kube_sim::bench::list_and_watch(5_000, 50).await?;
        println!(
            "list {} objects ({} bytes): {:?}; change delivered to first watcher {:?}, to all {} watchers {:?}",
            r.objects, r.list_bytes, r.list, r.watch_first, r.watchers, r.watch_all
        );
    }
    Ok(())
}
