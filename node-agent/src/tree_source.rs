//! A direct snapshot read by the agent itself, as the extractor's entries: its trees walked
//! depth first (a directory before what it holds, as `restic dump` orders a tar), its files'
//! data fetched blob by blob from their packs only when the extractor asks for it.
//!
//! This is how a direct snapshot is restored in place: the extractor takes a live file of
//! the snapshot's size and mtime as unchanged (restic's `--overwrite if-changed` rule) and
//! never asks for its data, so an in-place restore fetches only what changed, without
//! starting restic (whose every run derives the repository key again). Every other
//! guarantee is the extractor's, the same as for stream snapshots: each file written beside
//! its target and renamed over it, identical content left alone, hard links only to files
//! the restore placed, failures collected.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use futures::StreamExt;
use restic_wrapper::native::{
    BlobId, BlobIndex, NativeError, NativeRepository, NodeKind, TreeNode,
};
use tokio::runtime::Handle;

use crate::budget::AssignmentBudget;
use crate::error::AgentError;
use crate::extract::EntrySource;
use crate::stream::StreamError;
use crate::tar::{Entry, Kind, Segment};

/// Blobs of one file fetched ahead of the extractor (each up to 8 MiB, restic's largest chunk).
const AHEAD: usize = 4;

/// The current file's data as it arrives.
struct Data {
    blobs: tokio::sync::mpsc::Receiver<Result<Vec<u8>, NativeError>>,
    blob: Vec<u8>,
    at: usize,
}

/// One walk over a snapshot's trees.
pub struct TreeSource {
    handle: Handle,
    repo: Arc<NativeRepository>,
    index: Arc<BlobIndex>,
    budget: AssignmentBudget,
    /// The directories being walked, outermost first: each one's path and the nodes it has
    /// not returned yet.
    stack: Vec<(Vec<u8>, std::vec::IntoIter<TreeNode>)>,
    /// The first name of each file with several links, by (device, inode).
    first_names: HashMap<(u64, u64), Vec<u8>>,
    /// The data blobs of the entry returned last, not fetched until read.
    content: Vec<BlobId>,
    data: Option<Data>,
}

impl std::fmt::Debug for TreeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeSource")
            .field("depth", &self.stack.len())
            .finish_non_exhaustive()
    }
}

/// The repository's error carried through the extractor's `io::Error`, for
/// [`into_agent_error`] to take out again.
fn read_error(e: NativeError) -> io::Error {
    io::Error::other(e)
}

/// An extraction's error, with a failure to read the repository reported as that (and as
/// retryable as the repository says) rather than as a broken stream.
pub fn into_agent_error(e: StreamError) -> AgentError {
    match e {
        StreamError::Decode(io) => match io.downcast::<NativeError>() {
            Ok(native) => AgentError::ReadSnapshot(native),
            Err(io) => AgentError::Stream(StreamError::Decode(io)),
        },
        e => AgentError::Stream(e),
    }
}

impl TreeSource {
    /// Starts a walk at the snapshot's root tree (`tree`, hex). Call from a blocking thread:
    /// the repository is read through `handle`.
    pub fn new(
        handle: Handle,
        repo: Arc<NativeRepository>,
        index: Arc<BlobIndex>,
        tree: &str,
        budget: AssignmentBudget,
    ) -> io::Result<TreeSource> {
        let root = restic_wrapper::native::blob_id(tree).map_err(read_error)?;
        let mut source = TreeSource {
            handle,
            repo,
            index,
            budget,
            stack: Vec::new(),
            first_names: HashMap::new(),
            content: Vec::new(),
            data: None,
        };
        source.enter(Vec::new(), &root)?;
        Ok(source)
    }

    fn enter(&mut self, path: Vec<u8>, id: &BlobId) -> io::Result<()> {
        let nodes = self
            .handle
            .block_on(self.repo.tree(&self.index, id))
            .map_err(read_error)?;
        self.stack.push((path, nodes.into_iter()));
        Ok(())
    }

    /// The extractor's entry for a node, or `None` for what restic does not restore either
    /// (sockets, types it does not know).
    fn entry(&mut self, path: Vec<u8>, node: &TreeNode) -> Option<Entry> {
        let device = |n: &TreeNode| {
            let dev = n.device as rustix::fs::Dev;
            (rustix::fs::major(dev), rustix::fs::minor(dev))
        };
        let kind = match &node.kind {
            NodeKind::File => {
                let first = (node.links > 1)
                    .then(|| {
                        self.first_names
                            .entry((node.device_id, node.inode))
                            .or_insert_with(|| path.clone())
                            .clone()
                    })
                    .filter(|first| *first != path);
                match first {
                    Some(target) => Kind::HardLink { target },
                    None => Kind::File { size: node.size },
                }
            }
            NodeKind::Dir => Kind::Dir,
            NodeKind::Symlink => Kind::Symlink {
                target: node.link_target.clone(),
            },
            NodeKind::BlockDevice => {
                let (major, minor) = device(node);
                Kind::BlockDevice { major, minor }
            }
            NodeKind::CharDevice => {
                let (major, minor) = device(node);
                Kind::CharDevice { major, minor }
            }
            NodeKind::Fifo => Kind::Fifo,
            NodeKind::Socket | NodeKind::Other(_) => {
                tracing::debug!(path = %String::from_utf8_lossy(&path), kind = ?node.kind,
                    "not restored (restic restores no such entry either)");
                return None;
            }
        };
        Some(Entry {
            path,
            kind,
            mode: node.mode,
            uid: node.uid,
            gid: node.gid,
            mtime_secs: node.mtime_secs,
            mtime_nanos: node.mtime_nanos,
            xattrs: node.xattrs.clone(),
        })
    }

    /// Starts fetching the current file's blobs, `AHEAD` at a time.
    fn start_data(&mut self) {
        let ids = std::mem::take(&mut self.content);
        let (tx, rx) = tokio::sync::mpsc::channel(AHEAD);
        let (repo, index) = (self.repo.clone(), self.index.clone());
        self.handle.spawn(async move {
            let mut blobs = std::pin::pin!(repo.data_blobs(&index, ids, AHEAD));
            while let Some(blob) = blobs.next().await {
                // The extractor moved on (the file failed, or it is done): stop fetching.
                if tx.send(blob).await.is_err() {
                    break;
                }
            }
        });
        self.data = Some(Data {
            blobs: rx,
            blob: Vec::new(),
            at: 0,
        });
    }
}

impl EntrySource for TreeSource {
    fn next_entry(&mut self) -> io::Result<Option<Entry>> {
        // Whatever of the last file was not read is never fetched.
        self.data = None;
        self.content.clear();
        loop {
            let Some((dir, nodes)) = self.stack.last_mut() else {
                return Ok(None);
            };
            let Some(node) = nodes.next() else {
                self.stack.pop();
                continue;
            };
            let mut path = dir.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&node.name);
            let Some(entry) = self.entry(path.clone(), &node) else {
                continue;
            };
            match (&entry.kind, node.subtree) {
                (Kind::Dir, Some(sub)) => self.enter(path, &sub)?,
                (Kind::File { .. }, _) => self.content = node.content,
                _ => {}
            }
            return Ok(Some(entry));
        }
    }

    fn sparse_map(&self) -> Option<&[Segment]> {
        None
    }

    fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data.is_none() {
            self.start_data();
        }
        let Some(data) = self.data.as_mut() else {
            return Ok(0);
        };
        while data.at == data.blob.len() {
            match data.blobs.blocking_recv() {
                Some(Ok(blob)) => {
                    data.blob = blob;
                    data.at = 0;
                }
                Some(Err(e)) => return Err(read_error(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(data.blob.len() - data.at);
        buf[..n].copy_from_slice(&data.blob[data.at..data.at + n]);
        data.at += n;
        self.budget.acquire_blocking(n as u64, 0);
        Ok(n)
    }

    fn trusts_size_and_mtime(&self) -> bool {
        true
    }
}
