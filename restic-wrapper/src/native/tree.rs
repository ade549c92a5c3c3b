//! A snapshot's trees and file contents, read without restic: the repository's index (which
//! pack holds which blob, where), tree blobs decoded into nodes as restic writes them, and
//! data blobs fetched by range from their packs. Every blob is authenticated (its MAC) and
//! checked against its id (the SHA-256 of its plaintext) before it is returned, as restic
//! checks it: a corrupt or tampered pack fails the read, never restores wrong bytes.
//!
//! Why the agent reads these itself: `restic restore` derives the repository key on every run
//! (scrypt, by design half a second) and walks the whole snapshot; the agent's reader has its
//! key already and fetches only the files a restore must write.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::crypto::{MasterKey, Unpacker};
use super::{FETCH_CONCURRENCY, NativeError, NativeRepository};

/// A blob's id: the SHA-256 of its plaintext.
pub type BlobId = [u8; 32];

/// Where one blob is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Location {
    pack: u32,
    offset: u64,
    length: u32,
    /// The plaintext's length when the blob is stored compressed, otherwise 0.
    uncompressed: u32,
}

/// The repository's index: every tree and data blob and where it is.
#[derive(Debug, Default)]
pub struct BlobIndex {
    packs: Vec<BlobId>,
    trees: HashMap<BlobId, Location>,
    data: HashMap<BlobId, Location>,
}

impl BlobIndex {
    fn find(&self, kind: BlobKind, id: &BlobId) -> Result<Location, NativeError> {
        let map = match kind {
            BlobKind::Tree => &self.trees,
            BlobKind::Data => &self.data,
        };
        map.get(id).copied().ok_or_else(|| NativeError::Format {
            what: kind.name(),
            reason: format!("blob {} is not in the repository's index", hex::encode(id)),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobKind {
    Tree,
    Data,
}

impl BlobKind {
    fn name(self) -> &'static str {
        match self {
            BlobKind::Tree => "tree blob",
            BlobKind::Data => "data blob",
        }
    }
}

#[derive(serde::Deserialize)]
struct IndexFile {
    packs: Vec<IndexPack>,
}

#[derive(serde::Deserialize)]
struct IndexPack {
    id: String,
    blobs: Vec<IndexBlob>,
}

#[derive(serde::Deserialize)]
struct IndexBlob {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    offset: u64,
    length: u32,
    #[serde(default)]
    uncompressed_length: Option<u32>,
}

fn parse_id(text: &str, what: &'static str) -> Result<BlobId, NativeError> {
    let mut id = [0u8; 32];
    hex::decode_to_slice(text, &mut id).map_err(|e| NativeError::Format {
        what,
        reason: format!("id {text:?}: {e}"),
    })?;
    Ok(id)
}

/// A blob id from its hex form (a snapshot's `tree`, say).
pub fn blob_id(text: &str) -> Result<BlobId, NativeError> {
    parse_id(text, "blob id")
}

fn format_error(what: &'static str) -> impl Fn(serde_json::Error) -> NativeError {
    move |e| NativeError::Format {
        what,
        reason: e.to_string(),
    }
}

/// One decoded index file, with its pack numbers local to it.
fn decode_index(
    key: &MasterKey,
    unpacker: &mut Unpacker,
    id: &str,
    sealed: &[u8],
) -> Result<IndexFile, NativeError> {
    super::open_file(key, unpacker, "index", id, sealed)
}

impl BlobIndex {
    fn add(&mut self, file: IndexFile) -> Result<(), NativeError> {
        for pack in file.packs {
            let number = u32::try_from(self.packs.len()).map_err(|_| NativeError::Format {
                what: "index",
                reason: "more than 2^32 packs".into(),
            })?;
            self.packs.push(parse_id(&pack.id, "index")?);
            for blob in pack.blobs {
                let loc = Location {
                    pack: number,
                    offset: blob.offset,
                    length: blob.length,
                    uncompressed: blob.uncompressed_length.unwrap_or(0),
                };
                let map = match blob.kind.as_str() {
                    "tree" => &mut self.trees,
                    "data" => &mut self.data,
                    _ => continue,
                };
                // A blob stored twice (two backups racing) is read from either copy.
                map.entry(parse_id(&blob.id, "index")?).or_insert(loc);
            }
        }
        Ok(())
    }
}

/// What a tree node is, by restic's `type` field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    /// A block device (restic's `dev`).
    BlockDevice,
    CharDevice,
    Fifo,
    Socket,
    Other(String),
}

/// One entry of a tree, as restic wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeNode {
    /// The name's bytes (restic stores names Go-quoted, so any byte survives).
    pub name: Vec<u8>,
    pub kind: NodeKind,
    /// Permission bits with setuid, setgid and sticky, as in `st_mode & 0o7777`.
    pub mode: u32,
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
    pub uid: u64,
    pub gid: u64,
    pub inode: u64,
    pub device_id: u64,
    pub links: u64,
    pub size: u64,
    pub link_target: Vec<u8>,
    /// A device's `st_rdev`.
    pub device: u64,
    pub content: Vec<BlobId>,
    pub subtree: Option<BlobId>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

mod base64_bytes {
    use base64::Engine;
    use serde::Deserialize;

    pub fn opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[derive(serde::Deserialize)]
struct RawTree {
    #[serde(default)]
    nodes: Option<Vec<RawNode>>,
}

#[derive(serde::Deserialize)]
struct RawAttribute {
    name: String,
    #[serde(default, deserialize_with = "base64_bytes::opt")]
    value: Option<Vec<u8>>,
}

#[derive(serde::Deserialize)]
struct RawNode {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    mode: u32,
    #[serde(default)]
    mtime: Option<String>,
    #[serde(default)]
    uid: u64,
    #[serde(default)]
    gid: u64,
    #[serde(default)]
    inode: u64,
    #[serde(default)]
    device_id: u64,
    #[serde(default)]
    links: u64,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    linktarget: Option<String>,
    #[serde(default, deserialize_with = "base64_bytes::opt")]
    linktarget_raw: Option<Vec<u8>>,
    #[serde(default)]
    device: u64,
    #[serde(default)]
    content: Option<Vec<String>>,
    #[serde(default)]
    subtree: Option<String>,
    #[serde(default)]
    extended_attributes: Option<Vec<RawAttribute>>,
}

// Go's os.FileMode bits that restic stores beside the permissions.
const GO_SETUID: u32 = 1 << 23;
const GO_SETGID: u32 = 1 << 22;
const GO_STICKY: u32 = 1 << 20;

fn unix_mode(go: u32) -> u32 {
    let mut mode = go & 0o777;
    for (bit, unix) in [
        (GO_SETUID, 0o4000),
        (GO_SETGID, 0o2000),
        (GO_STICKY, 0o1000),
    ] {
        if go & bit != 0 {
            mode |= unix;
        }
    }
    mode
}

/// A timestamp as seconds and nanoseconds since the epoch (nanoseconds never negative).
fn timestamp(text: &str) -> Result<(i64, u32), NativeError> {
    let ts: jiff::Timestamp = text.parse().map_err(|e| NativeError::Format {
        what: "tree blob",
        reason: format!("time {text:?}: {e}"),
    })?;
    let (mut secs, mut nanos) = (ts.as_second(), ts.subsec_nanosecond());
    if nanos < 0 {
        secs -= 1;
        nanos += 1_000_000_000;
    }
    Ok((secs, nanos as u32))
}

/// The bytes of a name restic stored as Go's `strconv.Quote` without its quotes: escapes
/// `\a \b \f \n \r \t \v \\ \" \'`, `\xHH` (any byte), octal `\ooo`, `\uHHHH`, `\UHHHHHHHH`.
pub fn go_unquote(text: &str) -> Result<Vec<u8>, NativeError> {
    let bad = |why: &str| NativeError::Format {
        what: "tree blob",
        reason: format!("name {text:?}: {why}"),
    };
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let hex_at = |from: usize, n: usize| -> Result<u32, NativeError> {
        let digits = text
            .get(from..from + n)
            .ok_or_else(|| bad("short escape"))?;
        u32::from_str_radix(digits, 16).map_err(|_| bad("bad hex escape"))
    };
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let esc = *bytes.get(i + 1).ok_or_else(|| bad("trailing backslash"))?;
        i += 2;
        let simple = match esc {
            b'a' => Some(0x07),
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            b'v' => Some(0x0b),
            b'\\' | b'"' | b'\'' => Some(esc),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            continue;
        }
        match esc {
            b'x' => {
                out.push(hex_at(i, 2)? as u8);
                i += 2;
            }
            b'0'..=b'7' => {
                let digits = text.get(i - 1..i + 2).ok_or_else(|| bad("short escape"))?;
                let v = u32::from_str_radix(digits, 8).map_err(|_| bad("bad octal escape"))?;
                out.push(u8::try_from(v).map_err(|_| bad("octal escape above 255"))?);
                i += 2;
            }
            b'u' | b'U' => {
                let n = if esc == b'u' { 4 } else { 8 };
                let c = char::from_u32(hex_at(i, n)?).ok_or_else(|| bad("bad code point"))?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i += n;
            }
            _ => return Err(bad("unknown escape")),
        }
    }
    Ok(out)
}

impl RawNode {
    fn decode(self) -> Result<TreeNode, NativeError> {
        let kind = match self.kind.as_str() {
            "file" => NodeKind::File,
            "dir" => NodeKind::Dir,
            "symlink" => NodeKind::Symlink,
            "dev" => NodeKind::BlockDevice,
            "chardev" => NodeKind::CharDevice,
            "fifo" => NodeKind::Fifo,
            "socket" => NodeKind::Socket,
            other => NodeKind::Other(other.to_owned()),
        };
        let (mtime_secs, mtime_nanos) = match &self.mtime {
            Some(t) => timestamp(t)?,
            None => (0, 0),
        };
        let content = self
            .content
            .unwrap_or_default()
            .iter()
            .map(|id| parse_id(id, "tree blob"))
            .collect::<Result<_, _>>()?;
        let subtree = self
            .subtree
            .as_deref()
            .map(|id| parse_id(id, "tree blob"))
            .transpose()?;
        let xattrs = self
            .extended_attributes
            .unwrap_or_default()
            .into_iter()
            .map(|a| (a.name.into_bytes(), a.value.unwrap_or_default()))
            .collect();
        // An invalid UTF-8 target is kept raw beside its lossy text.
        let link_target = match (self.linktarget_raw, self.linktarget) {
            (Some(raw), _) => raw,
            (None, Some(text)) => text.into_bytes(),
            (None, None) => Vec::new(),
        };
        Ok(TreeNode {
            name: go_unquote(&self.name)?,
            kind,
            mode: unix_mode(self.mode),
            mtime_secs,
            mtime_nanos,
            uid: self.uid,
            gid: self.gid,
            inode: self.inode,
            device_id: self.device_id,
            links: self.links,
            size: self.size,
            link_target,
            device: self.device,
            content,
            subtree,
            xattrs,
        })
    }
}

/// Decodes a tree blob's plaintext. A node whose name is not one path component (empty, `.`,
/// `..`, or holding `/` or NUL) is refused: restic never writes one, and a reader that
/// joined it to a path could be led out of the directory it restores into.
pub fn decode_tree(plain: &[u8]) -> Result<Vec<TreeNode>, NativeError> {
    let raw: RawTree = serde_json::from_slice(plain).map_err(format_error("tree blob"))?;
    raw.nodes
        .unwrap_or_default()
        .into_iter()
        .map(|raw| {
            let node = raw.decode()?;
            let name = &node.name[..];
            if name.is_empty()
                || name == b"."
                || name == b".."
                || name.contains(&b'/')
                || name.contains(&0)
            {
                return Err(NativeError::Format {
                    what: "tree blob",
                    reason: format!(
                        "a node's name {:?} is not a single path component",
                        String::from_utf8_lossy(name)
                    ),
                });
            }
            Ok(node)
        })
        .collect()
}

thread_local! {
    static UNPACKER: std::cell::RefCell<Unpacker> = std::cell::RefCell::new(Unpacker::default());
}

/// Opens one blob as stored in its pack: authenticated, decompressed, checked against its id.
fn open_blob(
    key: &MasterKey,
    kind: BlobKind,
    id: &BlobId,
    loc: Location,
    sealed: &[u8],
) -> Result<Vec<u8>, NativeError> {
    let plain = key.decrypt(sealed).map_err(|e| match e {
        NativeError::Authentication { .. } => NativeError::Authentication { what: kind.name() },
        e => e,
    })?;
    let plain = if loc.uncompressed > 0 {
        UNPACKER.with(|u| {
            u.borrow_mut()
                .decompress(&plain, loc.uncompressed as usize, kind.name())
        })?
    } else {
        plain
    };
    if Sha256::digest(&plain).as_slice() != id {
        return Err(NativeError::HashMismatch {
            kind: kind.name(),
            id: hex::encode(id),
        });
    }
    Ok(plain)
}

impl NativeRepository {
    /// Reads every index file: restic's own first step, and the map for every blob read.
    pub async fn load_index(&self) -> Result<Arc<BlobIndex>, NativeError> {
        let names: Vec<String> = self
            .source
            .list("index")
            .await?
            .into_iter()
            .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        let mut index = BlobIndex::default();
        for file in self.get_decoded("index", names, decode_index).await? {
            index.add(file)?;
        }
        Ok(Arc::new(index))
    }

    /// One blob's plaintext.
    pub async fn blob(
        &self,
        index: &BlobIndex,
        kind: BlobKind,
        id: &BlobId,
    ) -> Result<Vec<u8>, NativeError> {
        let loc = index.find(kind, id)?;
        let pack = hex::encode(index.packs[loc.pack as usize]);
        let rel = format!("data/{}/{pack}", &pack[..2]);
        let sealed = self
            .source
            .get_range(rel, loc.offset, u64::from(loc.length))
            .await?;
        let (key, id) = (self.key.clone(), *id);
        // Decrypting and hashing a blob of up to 8 MiB is CPU work: off the async workers.
        tokio::task::spawn_blocking(move || open_blob(&key, kind, &id, loc, &sealed))
            .await
            .map_err(|e| NativeError::Store(format!("blob decoding task failed: {e}")))?
    }

    /// One tree's nodes, in restic's order (sorted by name).
    pub async fn tree(&self, index: &BlobIndex, id: &BlobId) -> Result<Vec<TreeNode>, NativeError> {
        let plain = self.blob(index, BlobKind::Tree, id).await?;
        decode_tree(&plain)
    }

    /// The data blobs `ids` in order, `ahead` of them in flight at once.
    pub fn data_blobs<'a>(
        &'a self,
        index: &'a BlobIndex,
        ids: Vec<BlobId>,
        ahead: usize,
    ) -> impl futures::Stream<Item = Result<Vec<u8>, NativeError>> + 'a {
        futures::stream::iter(ids)
            .map(move |id| async move { self.blob(index, BlobKind::Data, &id).await })
            .buffered(ahead.clamp(1, FETCH_CONCURRENCY))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_quoted_names_come_back_byte_for_byte() {
        let cases: [(&str, &[u8]); 7] = [
            ("plain", b"plain"),
            (r"n\xffx", b"n\xffx"),
            (r#"a\"b\\c"#, b"a\"b\\c"),
            (r"tab\there\n", b"tab\there\n"),
            (r"\a\b\f\v\r", b"\x07\x08\x0c\x0b\r"),
            (r"\u00e9\U0001f600", "é😀".as_bytes()),
            (r"\101\x41", b"AA"),
        ];
        for (quoted, want) in cases {
            assert_eq!(go_unquote(quoted).ok().as_deref(), Some(want), "{quoted}");
        }
        for bad in [r"end\", r"\q", r"\x4", r"\777"] {
            assert!(go_unquote(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn modes_and_times_become_unix_ones() {
        assert_eq!(unix_mode(0x8000_01ed), 0o755);
        assert_eq!(unix_mode(GO_SETUID | GO_STICKY | 0o644), 0o5644);
        assert_eq!(unix_mode(GO_SETGID | 0o750), 0o2750);
        assert_eq!(
            timestamp("1969-12-31T23:59:59.25Z").ok(),
            Some((-1, 250_000_000))
        );
        assert_eq!(
            timestamp("2250-01-01T00:00:00Z").ok(),
            Some((8_835_955_200, 0))
        );
    }

    #[test]
    fn a_tree_as_restic_writes_it_decodes() -> Result<(), NativeError> {
        let nodes = decode_tree(
            br#"{"nodes":[
              {"name":"b","type":"file","mode":420,"mtime":"2026-12-03T08:45:03.255953246Z",
               "uid":1,"gid":2,"inode":39017,"device_id":27,"size":3,"links":2,
               "extended_attributes":[{"name":"user.k","value":"dmFs"}],
               "content":["98ea6e4f216f2fb4b69fff9b3a44842c38686ca685f3f55dc48c5d3fb1107be4"]},
              {"name":"c","type":"chardev","mode":69206436,"device":259,"content":null},
              {"name":"d","type":"dir","mode":2147484141,"content":null,
               "subtree":"25a837b5f782a6e61a2c3c96c8a4886288c774d87631cd966bdaeb4ae1f451c5"},
              {"name":"s","type":"symlink","mode":134218239,"linktarget":"d/a","content":null},
              {"name":"r","type":"symlink","linktarget":"\ufffd","linktarget_raw":"/w==","content":null}
            ]}"#,
        )?;
        assert_eq!(nodes.len(), 5);
        assert_eq!(nodes[0].xattrs, vec![(b"user.k".to_vec(), b"val".to_vec())]);
        assert_eq!((nodes[0].links, nodes[0].size, nodes[0].uid), (2, 3, 1));
        assert_eq!(
            (nodes[1].kind.clone(), nodes[1].device),
            (NodeKind::CharDevice, 259)
        );
        assert!(nodes[2].subtree.is_some());
        assert_eq!(nodes[3].link_target, b"d/a");
        assert_eq!(nodes[4].link_target, b"\xff");
        Ok(())
    }

    #[test]
    fn names_that_are_not_one_path_component_are_refused() {
        for name in ["", ".", "..", "a/b", "../x", r"\\x00"] {
            let tree = format!(
                r#"{{"nodes":[{{"name":"{name}","type":"fifo","mode":33554852,"content":null}}]}}"#
            );
            assert!(
                matches!(
                    decode_tree(tree.as_bytes()),
                    Err(NativeError::Format { reason, .. }) if reason.contains("single path component")
                ),
                "{name:?}"
            );
        }
        let fine = br#"{"nodes":[{"name":"..a","type":"fifo","mode":33554852,"content":null}]}"#;
        assert!(decode_tree(fine).is_ok());
    }
}
