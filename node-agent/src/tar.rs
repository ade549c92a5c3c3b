//! POSIX tar (pax) encoding and decoding, just what the agent's streams need: regular files,
//! directories, symlinks, hard links, devices and FIFOs, with owners, modes, nanosecond
//! mtimes, extended attributes and names that are not UTF-8 (pax `hdrcharset=BINARY`).
//! Sparse files use GNU's pax "1.0" sparse format, which GNU tar reads and writes.
//! Written by hand because the stream must be produced incrementally on the reader thread and
//! read back under our own path checks.

use std::io::{self, Read, Write};

pub const BLOCK: usize = 512;

/// The most data segments a sparse entry may describe, written or read. Its map is held in
/// memory before the data (16 bytes a segment, so at most 16 MiB); a file more fragmented
/// than this is stored densely instead.
pub const MAX_SEGMENTS: usize = 1 << 20;

/// The largest pax header written or read: it holds an entry's extended attributes, which
/// Linux bounds at 64 KiB a value and 64 KiB of names (thousands of values on XFS or
/// tmpfs). The writer refuses an entry whose header would be larger, saying so, so that
/// whatever a backup writes its restore reads.
pub const MAX_PAX: usize = 64 << 20;

/// The largest ustar mtime (eleven octal digits, the year 2242).
const MAX_USTAR_TIME: i64 = 0o77777777777;

/// The pax prefix GNU tar uses for an extended attribute (name raw after it).
const SCHILY_XATTR: &[u8] = b"SCHILY.xattr.";
/// libarchive's: name percent-encoded, value base64. Used for names a SCHILY key cannot
/// carry (a pax key ends at its first `=`).
const LIBARCHIVE_XATTR: &[u8] = b"LIBARCHIVE.xattr.";

/// Longest decimal number in a sparse map (u64::MAX has 20 digits).
const MAX_DIGITS: usize = 20;

/// One run of data in a sparse file: `len` bytes at `offset`. What no segment covers is a
/// hole. A map may end with an empty segment at the file's size, which GNU tar needs to
/// restore a trailing hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
}

impl Segment {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Checks that a map is ordered, does not overlap, stays within `size` and is not too long;
/// returns the data bytes it describes.
fn check_map(map: &[Segment], size: u64) -> Result<u64, &'static str> {
    if map.len() > MAX_SEGMENTS {
        return Err("sparse map has too many segments");
    }
    let mut end = 0u64;
    let mut data = 0u64;
    for s in map {
        if s.offset < end {
            return Err("sparse map segments overlap or are out of order");
        }
        end = s
            .offset
            .checked_add(s.len)
            .filter(|e| *e <= size)
            .ok_or("sparse map segment ends past the file's size")?;
        data += s.len;
    }
    Ok(data)
}

/// The map as GNU's 1.0 format stores it ahead of the data: the segment count, then each
/// offset and length, one decimal number a line, padded to a whole block.
fn encode_map(map: &[Segment]) -> Vec<u8> {
    let mut text = format!("{}\n", map.len());
    for s in map {
        text.push_str(&format!("{}\n{}\n", s.offset, s.len));
    }
    let mut out = text.into_bytes();
    out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    out
}

/// The name GNU tar gives a sparse entry's ustar header, so that a reader without sparse
/// support extracts the raw segments beside the file rather than over it. A fixed number
/// (GNU tar uses its pid) keeps streams of an unchanged volume identical.
fn sparse_placeholder(path: &[u8]) -> Vec<u8> {
    let (dir, base) = match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => (&b""[..], path),
    };
    [dir, b"GNUSparseFile.0/", base].concat()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File { size: u64 },
    Dir,
    Symlink { target: Vec<u8> },
    HardLink { target: Vec<u8> },
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
}

/// One entry's metadata. `path` is relative to the volume root, without a leading `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    pub fn size(&self) -> u64 {
        match self.kind {
            Kind::File { size } => size,
            _ => 0,
        }
    }
}

fn octal(field: &mut [u8], value: u64) -> bool {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    if s.len() > digits {
        return false;
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    true
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "<len> <key>=<value>\n", where <len> counts itself.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len = len.to_string().len() + body;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Writes a tar stream.
#[derive(Debug)]
pub struct TarWriter<W: Write> {
    out: W,
    written: u64,
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter { out, written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn header(
        &mut self,
        e: &Entry,
        name: &[u8],
        typeflag: u8,
        size: u64,
        link: &[u8],
    ) -> io::Result<()> {
        let mut h = [0u8; BLOCK];
        let n = name.len().min(100);
        h[..n].copy_from_slice(&name[..n]);
        octal(&mut h[100..108], u64::from(e.mode & 0o7777));
        octal(&mut h[108..116], e.uid.min(0o7777777));
        octal(&mut h[116..124], e.gid.min(0o7777777));
        if !octal(&mut h[124..136], size) {
            return Err(io::Error::other("entry too large for a tar header"));
        }
        octal(
            &mut h[136..148],
            e.mtime_secs.clamp(0, MAX_USTAR_TIME) as u64,
        );
        h[156] = typeflag;
        let l = link.len().min(100);
        h[157..157 + l].copy_from_slice(&link[..l]);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        if let Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } = e.kind {
            octal(&mut h[329..337], u64::from(major));
            octal(&mut h[337..345], u64::from(minor));
        }
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        octal(&mut h[148..155], u64::from(sum));
        h[155] = b' ';
        self.write(&h)
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.write(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    /// Writes an entry's header (and a pax header before it when ustar cannot hold it). For
    /// a file, exactly `size` bytes of data must follow through [`TarWriter::data`], then
    /// [`TarWriter::finish_entry`].
    pub fn append_header(&mut self, e: &Entry) -> io::Result<()> {
        let mut name = e.path.clone();
        if e.kind == Kind::Dir && !name.ends_with(b"/") {
            name.push(b'/');
        }
        self.append(e, &name, e.size(), &[])
    }

    /// Writes a sparse file's headers and map in GNU's pax 1.0 sparse format. `e` holds the
    /// file's real size; `map` lists its data segments. Exactly the segments' bytes must
    /// follow through [`TarWriter::data`], in order, then [`TarWriter::finish_entry`] with
    /// their total, which this returns.
    pub fn append_sparse_header(&mut self, e: &Entry, map: &[Segment]) -> io::Result<u64> {
        let Kind::File { size } = e.kind else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only a regular file can be stored sparse",
            ));
        };
        let data = check_map(map, size)
            .map_err(|reason| io::Error::new(io::ErrorKind::InvalidInput, reason))?;
        let encoded = encode_map(map);
        let records: [(&[u8], Vec<u8>); 4] = [
            (b"GNU.sparse.major", b"1".to_vec()),
            (b"GNU.sparse.minor", b"0".to_vec()),
            (b"GNU.sparse.name", e.path.clone()),
            (b"GNU.sparse.realsize", size.to_string().into_bytes()),
        ];
        let stored = encoded.len() as u64 + data;
        self.append(e, &sparse_placeholder(&e.path), stored, &records)?;
        self.write(&encoded)?;
        Ok(data)
    }

    /// Writes the pax header (when needed) and the ustar header of an entry stored under
    /// `name` with `size` bytes of data, adding `extra` pax records.
    fn append(
        &mut self,
        e: &Entry,
        name: &[u8],
        size: u64,
        extra: &[(&[u8], Vec<u8>)],
    ) -> io::Result<()> {
        let (typeflag, link): (u8, &[u8]) = match &e.kind {
            Kind::File { .. } => (b'0', b""),
            Kind::Dir => (b'5', b""),
            Kind::Symlink { target } => (b'2', target),
            Kind::HardLink { target } => (b'1', target),
            Kind::CharDevice { .. } => (b'3', b""),
            Kind::BlockDevice { .. } => (b'4', b""),
            Kind::Fifo => (b'6', b""),
        };
        let mut pax = Vec::new();
        // Short names go into the ustar header as raw bytes, which every tar reads; only long
        // ones need pax records, and only long non-UTF-8 ones need `hdrcharset=BINARY`.
        let long_name = name.len() > 100;
        let long_link = link.len() > 100;
        let binary = (long_name && std::str::from_utf8(name).is_err())
            || (long_link && std::str::from_utf8(link).is_err())
            || extra.iter().any(|(_, v)| std::str::from_utf8(v).is_err());
        if binary {
            pax_record(&mut pax, b"hdrcharset", b"BINARY");
        }
        for (k, v) in extra {
            pax_record(&mut pax, k, v);
        }
        if long_name {
            pax_record(&mut pax, b"path", name);
        }
        if long_link {
            pax_record(&mut pax, b"linkpath", link);
        }
        if size > 0o77777777777 {
            pax_record(&mut pax, b"size", size.to_string().as_bytes());
        }
        if e.uid > 0o7777777 {
            pax_record(&mut pax, b"uid", e.uid.to_string().as_bytes());
        }
        if e.gid > 0o7777777 {
            pax_record(&mut pax, b"gid", e.gid.to_string().as_bytes());
        }
        if e.mtime_nanos != 0 || !(0..=MAX_USTAR_TIME).contains(&e.mtime_secs) {
            pax_record(
                &mut pax,
                b"mtime",
                pax_time(e.mtime_secs, e.mtime_nanos).as_bytes(),
            );
        }
        for (k, v) in &e.xattrs {
            if k.contains(&b'=') {
                let key = [LIBARCHIVE_XATTR, &percent_encode(k)].concat();
                pax_record(&mut pax, &key, &base64_encode(v));
            } else {
                pax_record(&mut pax, &[SCHILY_XATTR, k].concat(), v);
            }
        }
        if pax.len() > MAX_PAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the extended attributes of {} take {} bytes, more than the {} MiB a \
                     stream entry carries",
                    String::from_utf8_lossy(&e.path),
                    pax.len(),
                    MAX_PAX >> 20
                ),
            ));
        }
        if !pax.is_empty() {
            let pax_entry = Entry {
                path: b"PaxHeader".to_vec(),
                kind: Kind::File {
                    size: pax.len() as u64,
                },
                xattrs: vec![],
                ..e.clone()
            };
            self.header(&pax_entry, b"PaxHeader", b'x', pax.len() as u64, b"")?;
            self.write(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        let size = if typeflag == b'0' {
            size.min(0o77777777777)
        } else {
            0
        };
        self.header(e, name, typeflag, size, link)
    }

    pub fn data(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.write(chunk)
    }

    /// Pads the data of an entry of `size` bytes to the block boundary.
    pub fn finish_entry(&mut self, size: u64) -> io::Result<()> {
        self.pad(size)
    }

    /// Writes the end-of-archive marker and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.write(&[0u8; BLOCK * 2])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

fn parse_octal(field: &[u8]) -> io::Result<u64> {
    // Base-256 (GNU) for values that do not fit in octal.
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            v = v
                .checked_mul(256)
                .ok_or_else(|| bad("numeric field overflows"))?
                + u64::from(*b);
        }
        return Ok(v);
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .take_while(|b| *b != 0)
        .filter(|b| *b != b' ')
        .collect();
    if s.is_empty() {
        return Ok(0);
    }
    let text = std::str::from_utf8(&s).map_err(|_| bad("numeric field is not text"))?;
    u64::from_str_radix(text, 8).map_err(|_| bad("numeric field is not octal"))
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("invalid tar stream: {msg}"),
    )
}

fn cstr(field: &[u8]) -> Vec<u8> {
    field.iter().copied().take_while(|b| *b != 0).collect()
}

/// Reads a tar stream entry by entry.
#[derive(Debug)]
pub struct TarReader<R: Read> {
    input: R,
    /// Data bytes of the current entry not yet consumed, and its padding.
    remaining: u64,
    padding: u64,
    /// The current entry's data segments when it is stored sparse.
    sparse: Option<Vec<Segment>>,
}

impl<R: Read> TarReader<R> {
    pub fn new(input: R) -> Self {
        TarReader {
            input,
            remaining: 0,
            padding: 0,
            sparse: None,
        }
    }

    /// The current entry's data segments when it is a sparse file: its data (through
    /// [`TarReader::read_data`]) is then these segments one after the other, and everything
    /// else in the file is a hole.
    pub fn sparse_map(&self) -> Option<&[Segment]> {
        self.sparse.as_deref()
    }

    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.input.read_exact(&mut buf[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    fn read_pax(&mut self, size: u64) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if size > MAX_PAX as u64 {
            return Err(bad(&format!(
                "pax header larger than {} MiB",
                MAX_PAX >> 20
            )));
        }
        let mut data = vec![0u8; size as usize];
        self.input.read_exact(&mut data)?;
        self.skip((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64)?;
        let mut records = Vec::new();
        let mut rest = &data[..];
        while !rest.is_empty() {
            let space = rest
                .iter()
                .position(|b| *b == b' ')
                .ok_or_else(|| bad("pax record without length"))?;
            let len: usize = std::str::from_utf8(&rest[..space])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("pax record length"))?;
            if len > rest.len() || len < space + 2 {
                return Err(bad("pax record length out of range"));
            }
            let record = &rest[space + 1..len - 1];
            let eq = record
                .iter()
                .position(|b| *b == b'=')
                .ok_or_else(|| bad("pax record without '='"))?;
            records.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
            rest = &rest[len..];
        }
        Ok(records)
    }

    /// The next entry, or `None` at the end of the archive. The previous entry's unread data
    /// is skipped.
    pub fn next_entry(&mut self) -> io::Result<Option<Entry>> {
        self.skip(self.remaining + self.padding)?;
        self.remaining = 0;
        self.padding = 0;
        self.sparse = None;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        loop {
            let mut h = [0u8; BLOCK];
            match self.input.read_exact(&mut h) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
            if h.iter().all(|b| *b == 0) {
                return Ok(None);
            }
            let stored = parse_octal(&h[148..156])?;
            let mut sum_block = h;
            sum_block[148..156].copy_from_slice(b"        ");
            let sum: u64 = sum_block.iter().map(|b| u64::from(*b)).sum();
            if sum != stored {
                return Err(bad("header checksum mismatch"));
            }
            let typeflag = h[156];
            let mut size = parse_octal(&h[124..136])?;
            match typeflag {
                b'x' => {
                    pax.extend(self.read_pax(size)?);
                    continue;
                }
                b'g' => {
                    self.read_pax(size)?;
                    continue;
                }
                b'L' => {
                    let mut name = self.read_pax_raw(size)?;
                    while name.last() == Some(&0) {
                        name.pop();
                    }
                    long_name = Some(name);
                    continue;
                }
                _ => {}
            }
            let mut path = {
                let name = cstr(&h[0..100]);
                let prefix = cstr(&h[345..500]);
                if &h[257..262] == b"ustar" && !prefix.is_empty() {
                    [prefix, b"/".to_vec(), name].concat()
                } else {
                    name
                }
            };
            let mut link = cstr(&h[157..257]);
            let mut uid = parse_octal(&h[108..116])?;
            let mut gid = parse_octal(&h[116..124])?;
            let mut mtime_secs = parse_octal(&h[136..148])? as i64;
            let mut mtime_nanos = 0u32;
            let mut xattrs = Vec::new();
            if let Some(n) = long_name.take() {
                path = n;
            }
            let mut sparse = SparseRecords::default();
            for (k, v) in pax.drain(..) {
                match k.as_slice() {
                    b"path" => path = v,
                    b"GNU.sparse.major" => sparse.major = Some(parse_dec(&v)?),
                    b"GNU.sparse.minor" => sparse.minor = Some(parse_dec(&v)?),
                    b"GNU.sparse.name" => sparse.name = Some(v),
                    b"GNU.sparse.realsize" => sparse.realsize = Some(parse_dec(&v)?),
                    // The 0.x formats keep the map in pax records; nothing writes them today.
                    k if k.starts_with(b"GNU.sparse.") => sparse.old_format = true,
                    b"linkpath" => link = v,
                    b"size" => size = parse_dec(&v)?,
                    b"uid" => uid = parse_dec(&v)?,
                    b"gid" => gid = parse_dec(&v)?,
                    b"mtime" => (mtime_secs, mtime_nanos) = parse_pax_time(&v)?,
                    k if k.starts_with(SCHILY_XATTR) => {
                        xattrs.push((k[SCHILY_XATTR.len()..].to_vec(), v));
                    }
                    k if k.starts_with(LIBARCHIVE_XATTR) => {
                        let name = percent_decode(&k[LIBARCHIVE_XATTR.len()..])?;
                        xattrs.push((name, base64_decode(&v)?));
                    }
                    _ => {}
                }
            }
            let sparse = sparse.check(typeflag)?;
            if let Some((name, _)) = &sparse {
                // The ustar name is GNU's placeholder for readers without sparse support.
                path = name.clone();
            }
            while path.len() > 1 && path.ends_with(b"/") {
                path.pop();
            }
            let major = parse_octal(&h[329..337]).unwrap_or(0) as u32;
            let minor = parse_octal(&h[337..345]).unwrap_or(0) as u32;
            let kind = match typeflag {
                b'0' | 0 | b'7' => match &sparse {
                    Some((_, realsize)) => Kind::File { size: *realsize },
                    None => Kind::File { size },
                },
                b'5' => Kind::Dir,
                b'2' => Kind::Symlink { target: link },
                b'1' => Kind::HardLink { target: link },
                b'3' => Kind::CharDevice { major, minor },
                b'4' => Kind::BlockDevice { major, minor },
                b'6' => Kind::Fifo,
                other => return Err(bad(&format!("unsupported entry type {:?}", other as char))),
            };
            let data = if matches!(kind, Kind::File { .. }) {
                size
            } else {
                0
            };
            self.padding = (BLOCK as u64 - data % BLOCK as u64) % BLOCK as u64;
            self.remaining = data;
            if let Some((_, realsize)) = sparse {
                let (map, map_len) = read_sparse_map(&mut self.input, data, realsize)?;
                // The map is whole blocks, so the padding after the segments is unchanged.
                self.remaining = data - map_len;
                self.sparse = Some(map);
            }
            return Ok(Some(Entry {
                path,
                kind,
                mode: parse_octal(&h[100..108])? as u32,
                uid,
                gid,
                mtime_secs,
                mtime_nanos,
                xattrs,
            }));
        }
    }

    fn read_pax_raw(&mut self, size: u64) -> io::Result<Vec<u8>> {
        if size > 1 << 20 {
            return Err(bad("long name larger than 1 MiB"));
        }
        let mut data = vec![0u8; size as usize];
        self.input.read_exact(&mut data)?;
        self.skip((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64)?;
        Ok(data)
    }

    /// Reads and discards the rest of the input, to its end. A writer feeding the archive
    /// through a pipe (`restic dump`) fails with a broken pipe if the reader leaves before
    /// it has written everything, such as the second end-of-archive block.
    pub fn drain(&mut self) -> io::Result<u64> {
        io::copy(&mut self.input, &mut io::sink())
    }

    /// Reads the current entry's data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let k = (buf.len() as u64).min(self.remaining) as usize;
        let n = self.input.read(&mut buf[..k])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "tar data cut short",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// The `GNU.sparse.*` pax records of one entry.
#[derive(Debug, Default)]
struct SparseRecords {
    major: Option<u64>,
    minor: Option<u64>,
    name: Option<Vec<u8>>,
    realsize: Option<u64>,
    old_format: bool,
}

impl SparseRecords {
    /// The real name and size of a sparse entry in the 1.0 format, `None` for an ordinary
    /// entry; any other sparse format is refused rather than restored as its raw encoding.
    fn check(self, typeflag: u8) -> io::Result<Option<(Vec<u8>, u64)>> {
        match (self.major, self.minor) {
            (None, None) if !self.old_format && self.name.is_none() && self.realsize.is_none() => {
                Ok(None)
            }
            (Some(1), Some(0)) => {
                if !matches!(typeflag, b'0' | 0 | b'7') {
                    return Err(bad("sparse records on an entry that is not a regular file"));
                }
                match (self.name, self.realsize) {
                    (Some(name), Some(realsize)) => Ok(Some((name, realsize))),
                    _ => Err(bad("sparse entry without GNU.sparse.name or realsize")),
                }
            }
            (None, None) => Err(bad("GNU sparse format 0.x is not supported")),
            (major, minor) => Err(bad(&format!(
                "GNU sparse format {}.{} is not supported",
                major.map_or("?".into(), |v| v.to_string()),
                minor.map_or("?".into(), |v| v.to_string())
            ))),
        }
    }
}

/// Reads the sparse map at the start of an entry of `stored` bytes (map included) whose
/// file is `realsize` bytes long. Returns the map and the bytes it took (whole blocks).
/// Nothing is allocated ahead of what the stream actually holds, and every segment is
/// checked, so a hostile map fails here rather than in the extractor.
pub fn read_sparse_map<R: Read>(
    input: &mut R,
    stored: u64,
    realsize: u64,
) -> io::Result<(Vec<Segment>, u64)> {
    let mut lines = MapLines {
        input,
        block: [0; BLOCK],
        pos: BLOCK,
        left: stored,
        consumed: 0,
    };
    let count = lines.number()?;
    if count > MAX_SEGMENTS as u64 {
        return Err(bad(&format!(
            "sparse map of {count} segments exceeds the limit of {MAX_SEGMENTS}"
        )));
    }
    let mut map = Vec::new();
    for _ in 0..count {
        let offset = lines.number()?;
        let len = lines.number()?;
        map.push(Segment { offset, len });
    }
    let data = check_map(&map, realsize).map_err(bad)?;
    if data != lines.left {
        return Err(bad(&format!(
            "sparse map describes {data} data bytes but the entry holds {}",
            lines.left
        )));
    }
    Ok((map, lines.consumed))
}

/// Decimal lines of a sparse map, read a block at a time and never past the entry.
struct MapLines<'a, R> {
    input: &'a mut R,
    block: [u8; BLOCK],
    pos: usize,
    /// Entry bytes not yet read.
    left: u64,
    consumed: u64,
}

impl<R: Read> MapLines<'_, R> {
    fn number(&mut self) -> io::Result<u64> {
        let mut value = 0u64;
        let mut digits = 0;
        loop {
            if self.pos == BLOCK {
                if self.left < BLOCK as u64 {
                    return Err(bad("sparse map runs past its entry"));
                }
                self.input.read_exact(&mut self.block)?;
                self.left -= BLOCK as u64;
                self.consumed += BLOCK as u64;
                self.pos = 0;
            }
            let b = self.block[self.pos];
            self.pos += 1;
            match b {
                b'0'..=b'9' if digits < MAX_DIGITS => {
                    digits += 1;
                    value = value
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(b - b'0')))
                        .ok_or_else(|| bad("sparse map number overflows"))?;
                }
                b'0'..=b'9' => return Err(bad("sparse map number too long")),
                b'\n' if digits > 0 => return Ok(value),
                _ => return Err(bad("sparse map is not decimal lines")),
            }
        }
    }
}

/// A time as pax writes it: decimal seconds with a fraction, the sign applying to both
/// (`-1.25` is a quarter second after -2).
fn pax_time(secs: i64, nanos: u32) -> String {
    if secs < 0 && nanos > 0 {
        format!("-{}.{:09}", -(secs + 1), 1_000_000_000 - nanos)
    } else {
        format!("{secs}.{nanos:09}")
    }
}

fn parse_pax_time(v: &[u8]) -> io::Result<(i64, u32)> {
    let text = std::str::from_utf8(v).map_err(|_| bad("pax mtime"))?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("pax mtime"));
    }
    let whole: i64 = whole.parse().map_err(|_| bad("pax mtime"))?;
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().map_err(|_| bad("pax mtime"))?;
    Ok(match (negative, nanos) {
        (false, _) => (whole, nanos),
        (true, 0) => (-whole, 0),
        (true, n) => (-whole - 1, 1_000_000_000 - n),
    })
}

/// Percent-encodes what a pax key cannot hold as such (`=`, `%`, controls, non-ASCII).
fn percent_encode(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    for b in name {
        if b.is_ascii_graphic() && *b != b'=' && *b != b'%' {
            out.push(*b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

fn percent_decode(text: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("xattr name escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    Ok(out)
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(BASE64[(n >> (18 - 6 * i) & 63) as usize]);
        }
    }
    // libarchive writes and reads it unpadded.
    out
}

fn base64_decode(text: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for b in text.iter().take_while(|b| **b != b'=') {
        let v = BASE64
            .iter()
            .position(|c| c == b)
            .ok_or_else(|| bad("xattr value is not base64"))?;
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

fn parse_dec(v: &[u8]) -> io::Result<u64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("pax number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &[u8], kind: Kind) -> Entry {
        Entry {
            path: path.to_vec(),
            kind,
            mode: 0o640,
            uid: 1000,
            gid: 3_000_000,
            mtime_secs: 1_700_000_000,
            mtime_nanos: 123_456_789,
            xattrs: vec![(b"user.note".to_vec(), b"hi".to_vec())],
        }
    }

    #[test]
    fn entries_round_trip_including_long_and_binary_names() -> io::Result<()> {
        let long = [b"d/".as_slice(), &[b'x'; 150]].concat();
        let binary = b"caf\xe9-\xff.txt".to_vec();
        let entries = vec![
            entry(b"d", Kind::Dir),
            entry(&long, Kind::File { size: 5 }),
            entry(&binary, Kind::File { size: 0 }),
            entry(
                b"d/link",
                Kind::Symlink {
                    target: long.clone(),
                },
            ),
            entry(
                b"d/hard",
                Kind::HardLink {
                    target: long.clone(),
                },
            ),
            entry(b"fifo", Kind::Fifo),
        ];
        let mut w = TarWriter::new(Vec::new());
        for e in &entries {
            w.append_header(e)?;
            if e.size() > 0 {
                w.data(b"hello")?;
                w.finish_entry(e.size())?;
            }
        }
        let bytes = w.finish()?;
        assert_eq!(bytes.len() % BLOCK, 0);
        let mut r = TarReader::new(&bytes[..]);
        let mut back = Vec::new();
        while let Some(e) = r.next_entry()? {
            let mut data = vec![0u8; 16];
            let n = r.read_data(&mut data)?;
            if e.size() > 0 {
                assert_eq!(&data[..n], b"hello");
            }
            back.push(e);
        }
        assert_eq!(back, entries);
        Ok(())
    }

    #[test]
    fn times_and_attributes_ustar_cannot_hold_round_trip() -> io::Result<()> {
        let mut entries = Vec::new();
        for (secs, nanos) in [
            (-1, 500_000_000),
            (-2, 750_000_000),
            (-86_400 * 365 * 30, 0),
            (0, 1),
            (MAX_USTAR_TIME, 0),
            (MAX_USTAR_TIME + 1, 0),
            (9_000_000_000_000, 999_999_999),
        ] {
            let mut e = entry(format!("t{secs}").as_bytes(), Kind::File { size: 0 });
            (e.mtime_secs, e.mtime_nanos) = (secs, nanos);
            entries.push(e);
        }
        let mut odd = entry(b"odd", Kind::File { size: 0 });
        odd.xattrs = vec![
            (b"user.key=part".to_vec(), b"value=with=signs".to_vec()),
            (b"user.%pct".to_vec(), vec![0, 255, 10, b'=']),
            (b"user.plain".to_vec(), b"a\nb".to_vec()),
            (b"user.big".to_vec(), vec![7u8; 65536]),
        ];
        entries.push(odd);
        let mut w = TarWriter::new(Vec::new());
        for e in &entries {
            w.append_header(e)?;
        }
        let bytes = w.finish()?;
        let mut r = TarReader::new(&bytes[..]);
        let mut back = Vec::new();
        while let Some(e) = r.next_entry()? {
            back.push(e);
        }
        assert_eq!(back, entries);
        // A pre-1970 time as GNU tar writes it (its listing shows such times wrongly).
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("old");
        std::fs::write(&f, b"")?;
        let status = std::process::Command::new("touch")
            .args(["-d", "1969-12-31 23:59:58.75 UTC"])
            .arg(&f)
            .status()?;
        assert!(status.success());
        let out = std::process::Command::new("tar")
            .args(["--format=pax", "-cf", "-", "-C"])
            .arg(dir.path())
            .arg("old")
            .output()?;
        assert!(out.status.success());
        let e = TarReader::new(&out.stdout[..])
            .next_entry()?
            .ok_or_else(|| io::Error::other("no entry"))?;
        assert_eq!((e.mtime_secs, e.mtime_nanos), (-2, 750_000_000));
        assert_eq!(pax_time(-2, 750_000_000), "-1.250000000");
        Ok(())
    }

    #[test]
    fn attributes_beyond_the_pax_limit_are_refused_when_written() {
        let mut e = entry(b"huge", Kind::File { size: 0 });
        e.xattrs = (0..1100)
            .map(|i| (format!("user.a{i}").into_bytes(), vec![1u8; 65536]))
            .collect();
        let mut w = TarWriter::new(Vec::new());
        let err = w.append_header(&e).expect_err("too large");
        assert!(err.to_string().contains("more than the 64 MiB"), "{err}");
        assert_eq!(w.written(), 0);
    }

    #[test]
    fn gnu_tar_reads_our_stream() -> io::Result<()> {
        // The system's tar must accept what we write: it is the reference reader.
        let dir = tempfile::tempdir()?;
        let mut w = TarWriter::new(Vec::new());
        w.append_header(&entry(b"a.txt", Kind::File { size: 5 }))?;
        w.data(b"hello")?;
        w.finish_entry(5)?;
        let long = [&[b'y'; 120][..], b".txt"].concat();
        w.append_header(&entry(&long, Kind::File { size: 0 }))?;
        let tar = w.finish()?;
        let status = std::process::Command::new("tar")
            .args(["-x", "-C"])
            .arg(dir.path())
            .stdin({
                let p = dir.path().join("in.tar");
                std::fs::write(&p, &tar)?;
                std::fs::File::open(p)?
            })
            .status()?;
        assert!(status.success());
        assert_eq!(std::fs::read(dir.path().join("a.txt"))?, b"hello");
        assert!(
            dir.path()
                .join(String::from_utf8_lossy(&long).as_ref())
                .exists()
        );
        Ok(())
    }

    #[test]
    fn corrupt_headers_are_refused() {
        let mut w = TarWriter::new(Vec::new());
        w.append_header(&entry(b"a", Kind::Dir)).ok();
        let mut bytes = w.finish().unwrap_or_default();
        bytes[10] ^= 1;
        let err = TarReader::new(&bytes[..]).next_entry();
        assert!(err.is_err());
    }

    fn sparse_tar(entries: &[(Entry, Vec<Segment>)], content: impl Fn(u64) -> u8) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        for (e, map) in entries {
            let data = w.append_sparse_header(e, map).unwrap();
            for s in map {
                let bytes: Vec<u8> = (s.offset..s.end()).map(&content).collect();
                w.data(&bytes).unwrap();
            }
            w.finish_entry(data).unwrap();
        }
        w.finish().unwrap()
    }

    fn seg(offset: u64, len: u64) -> Segment {
        Segment { offset, len }
    }

    /// The byte at `offset` of the test files: never zero, so holes stand out.
    fn content(offset: u64) -> u8 {
        (offset % 251) as u8 + 1
    }

    #[test]
    fn sparse_entries_round_trip() -> io::Result<()> {
        let long = [&[b'z'; 120][..], b"/s\xff"].concat();
        let entries = vec![
            (
                entry(b"dir/a", Kind::File { size: 10 << 20 }),
                vec![seg(0, 4096), seg(5 << 20, 1000), seg(10 << 20, 0)],
            ),
            (
                entry(&long, Kind::File { size: 3 << 20 }),
                vec![seg((3 << 20) - 700, 700)],
            ),
        ];
        let bytes = sparse_tar(&entries, content);
        let mut r = TarReader::new(&bytes[..]);
        for (want, map) in &entries {
            let got = r.next_entry()?.expect("an entry");
            assert_eq!(&got, want);
            assert_eq!(r.sparse_map(), Some(&map[..]));
            let mut data = Vec::new();
            let mut buf = [0u8; 777];
            loop {
                let n = r.read_data(&mut buf)?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            let expected: Vec<u8> = map
                .iter()
                .flat_map(|s| s.offset..s.end())
                .map(content)
                .collect();
            assert_eq!(data, expected);
        }
        assert!(r.next_entry()?.is_none());
        Ok(())
    }

    #[test]
    fn gnu_tar_restores_our_sparse_entries_with_their_holes() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let entries = vec![
            (
                entry(b"middle", Kind::File { size: 8 << 20 }),
                vec![
                    seg(0, 8192),
                    seg(4 << 20, 4096),
                    seg((8 << 20) - 4096, 4096),
                ],
            ),
            // Ends in a hole: GNU tar needs the map's empty last segment to size it.
            (
                entry(b"trailing-hole", Kind::File { size: 8 << 20 }),
                vec![seg(1 << 20, 4096), seg(8 << 20, 0)],
            ),
            (
                entry(b"all-hole", Kind::File { size: 2 << 20 }),
                vec![seg(2 << 20, 0)],
            ),
        ];
        let tar = dir.path().join("in.tar");
        std::fs::write(&tar, sparse_tar(&entries, content))?;
        let out = dir.path().join("out");
        std::fs::create_dir(&out)?;
        let status = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&out)
            .status()?;
        assert!(status.success());
        for (e, map) in &entries {
            let name = String::from_utf8_lossy(&e.path).into_owned();
            let got = std::fs::read(out.join(&name))?;
            assert_eq!(got.len() as u64, e.size(), "{name}");
            let mut want = vec![0u8; e.size() as usize];
            for s in map {
                for i in s.offset..s.end() {
                    want[i as usize] = content(i);
                }
            }
            assert!(got == want, "{name} differs");
            let blocks =
                std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(out.join(&name))?);
            assert!(blocks * 512 < 1 << 20, "{name} was restored dense");
        }
        assert!(!out.join("GNUSparseFile.0").exists());
        Ok(())
    }

    #[test]
    fn sparse_entries_written_by_gnu_tar_are_read() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("holey");
        let f = std::fs::File::create(&path)?;
        f.set_len(6 << 20)?;
        let chunk: Vec<u8> = (0..8192).map(content).collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &chunk, 2 << 20)?;
        drop(f);
        let out = std::process::Command::new("tar")
            .args([
                "--format=pax",
                "--sparse",
                "--sparse-version=1.0",
                "-cf",
                "-",
                "-C",
            ])
            .arg(dir.path())
            .arg("holey")
            .output()?;
        assert!(out.status.success());
        let mut r = TarReader::new(&out.stdout[..]);
        let e = r.next_entry()?.expect("an entry");
        assert_eq!(e.path, b"holey");
        assert_eq!(e.kind, Kind::File { size: 6 << 20 });
        let map = r.sparse_map().expect("a sparse entry").to_vec();
        assert_eq!(map, vec![seg(2 << 20, 8192), seg(6 << 20, 0)]);
        let mut data = vec![0u8; 10000];
        let mut n = 0;
        while let k @ 1.. = r.read_data(&mut data[n..])? {
            n += k;
        }
        assert_eq!(&data[..n], &chunk[..]);
        assert!(r.next_entry()?.is_none());
        Ok(())
    }

    /// A map's text padded to a block, as an entry of `stored` bytes would start.
    fn map_block(text: &str) -> Vec<u8> {
        let mut b = text.as_bytes().to_vec();
        b.resize(b.len().div_ceil(BLOCK) * BLOCK, 0);
        b
    }

    #[test]
    fn malformed_sparse_maps_are_refused() {
        // A block's worth of "0\n" lines: complete numbers up to the block's last byte.
        let exact = format!("200\n{}", "0\n".repeat(254));
        assert_eq!(exact.len(), BLOCK);
        let cases: Vec<(&str, Vec<u8>, u64, u64, &str)> = vec![
            (
                "huge count",
                map_block("99999999999999\n"),
                512,
                1 << 40,
                "exceeds the limit",
            ),
            (
                "overflow",
                map_block("18446744073709551616\n"),
                512,
                1,
                "overflows",
            ),
            (
                "too many digits",
                map_block(&"0".repeat(30)),
                512,
                1,
                "too long",
            ),
            (
                "not a number",
                map_block("2\nten\n"),
                512,
                100,
                "not decimal",
            ),
            ("empty line", map_block("1\n\n5\n"), 512, 100, "not decimal"),
            (
                "cut by padding",
                map_block("2\n0\n5\n"),
                517,
                100,
                "not decimal",
            ),
            (
                "past the entry",
                exact.clone().into_bytes(),
                512,
                100,
                "runs past",
            ),
            (
                "out of order",
                map_block("2\n50\n5\n0\n5\n"),
                522,
                100,
                "out of order",
            ),
            (
                "overlapping",
                map_block("2\n0\n10\n5\n10\n"),
                532,
                100,
                "overlap",
            ),
            (
                "past the size",
                map_block("1\n90\n20\n"),
                532,
                100,
                "past the file",
            ),
            (
                "offset overflow",
                map_block("1\n18446744073709551615\n2\n"),
                514,
                u64::MAX,
                "past the file",
            ),
            (
                "too little data",
                map_block("1\n0\n10\n"),
                515,
                100,
                "describes 10",
            ),
            ("too much data", map_block("0\n"), 600, 100, "describes 0"),
        ];
        for (what, bytes, stored, realsize, message) in cases {
            let mut input = &bytes[..];
            let err = read_sparse_map(&mut input, stored, realsize).expect_err(what);
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}: {err}");
            assert!(err.to_string().contains(message), "{what}: {err}");
        }
        // A stream that ends inside the map is an I/O error, not a panic.
        let err = read_sparse_map(&mut &b"3\n0\n"[..], 1024, 100).expect_err("cut");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // The well-formed neighbour of those cases is accepted.
        let (map, used) =
            read_sparse_map(&mut &map_block("2\n0\n5\n50\n5\n")[..], 522, 100).expect("a good map");
        assert_eq!((map, used), (vec![seg(0, 5), seg(50, 5)], 512));
    }

    #[test]
    fn unsupported_sparse_formats_are_refused() {
        type Records = Vec<(&'static [u8], Vec<u8>)>;
        let records: Vec<(&str, Records, Kind)> = vec![
            (
                "version 2.0",
                vec![
                    (b"GNU.sparse.major", b"2".to_vec()),
                    (b"GNU.sparse.minor", b"0".to_vec()),
                    (b"GNU.sparse.name", b"f".to_vec()),
                    (b"GNU.sparse.realsize", b"10".to_vec()),
                ],
                Kind::File { size: 512 },
            ),
            (
                "format 0.1",
                vec![
                    (b"GNU.sparse.numblocks", b"1".to_vec()),
                    (b"GNU.sparse.map", b"0,5".to_vec()),
                ],
                Kind::File { size: 5 },
            ),
            (
                "no real size",
                vec![
                    (b"GNU.sparse.major", b"1".to_vec()),
                    (b"GNU.sparse.minor", b"0".to_vec()),
                    (b"GNU.sparse.name", b"f".to_vec()),
                ],
                Kind::File { size: 512 },
            ),
            (
                "on a directory",
                vec![
                    (b"GNU.sparse.major", b"1".to_vec()),
                    (b"GNU.sparse.minor", b"0".to_vec()),
                    (b"GNU.sparse.name", b"f".to_vec()),
                    (b"GNU.sparse.realsize", b"10".to_vec()),
                ],
                Kind::Dir,
            ),
        ];
        for (what, extra, kind) in records {
            let e = entry(b"f", kind);
            let mut w = TarWriter::new(Vec::new());
            w.append(&e, b"f", e.size(), &extra).unwrap();
            w.write(&vec![0u8; e.size() as usize]).unwrap();
            w.finish_entry(e.size()).unwrap();
            let bytes = w.finish().unwrap();
            let err = TarReader::new(&bytes[..]).next_entry().expect_err(what);
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}: {err}");
            assert!(err.to_string().contains("sparse"), "{what}: {err}");
        }
    }

    #[test]
    fn maps_the_writer_cannot_honour_are_refused() {
        let mut w = TarWriter::new(Vec::new());
        let e = entry(b"f", Kind::File { size: 100 });
        for map in [vec![seg(50, 5), seg(0, 5)], vec![seg(90, 20)]] {
            let err = w.append_sparse_header(&e, &map).expect_err("a bad map");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
        assert_eq!(w.written(), 0, "nothing written for a refused map");
    }
}
