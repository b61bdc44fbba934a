//! A minimal raw PostgreSQL v3 client (trust auth only) for tests that must see exact bytes:
//! BackendKeyData, ParameterStatus, NoticeResponse ordering, non-UTF-8 text.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct RawConn {
    stream: TcpStream,
    pub pid: i32,
    pub key: Vec<u8>,
    pub params: Vec<(Vec<u8>, Vec<u8>)>,
}

pub type Msg = (u8, Vec<u8>);

impl RawConn {
    pub fn connect(port: u16, params: &[(&str, &[u8])]) -> std::io::Result<(RawConn, Vec<Msg>)> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut body = 196_608u32.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v);
            body.push(0);
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        stream.write_all(&packet)?;
        let mut conn = RawConn {
            stream,
            pid: 0,
            key: Vec::new(),
            params: Vec::new(),
        };
        let msgs = conn.read_until_ready()?;
        for (tag, body) in &msgs {
            match tag {
                b'K' => {
                    conn.pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    conn.key = body.clone();
                }
                b'S' => conn.params.push(split_status(body)),
                _ => {}
            }
        }
        Ok((conn, msgs))
    }

    pub fn send(&mut self, tag: u8, body: &[u8]) -> std::io::Result<()> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        self.stream.write_all(&m)
    }

    pub fn read_msg(&mut self) -> std::io::Result<Msg> {
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body)?;
        Ok((head[0], body))
    }

    /// Read messages up to and including ReadyForQuery (or a FATAL/EOF ends the list).
    pub fn read_until_ready(&mut self) -> std::io::Result<Vec<Msg>> {
        let mut msgs = Vec::new();
        loop {
            let m = self.read_msg()?;
            let done = m.0 == b'Z';
            msgs.push(m);
            if done {
                return Ok(msgs);
            }
        }
    }

    /// Simple query: send and collect the response up to ReadyForQuery.
    pub fn query(&mut self, sql: &[u8]) -> std::io::Result<Vec<Msg>> {
        let mut body = sql.to_vec();
        body.push(0);
        self.send(b'Q', &body)?;
        self.read_until_ready()
    }

    pub fn raw_stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

pub fn split_status(body: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut parts = body.split(|b| *b == 0);
    let k = parts.next().unwrap_or_default().to_vec();
    let v = parts.next().unwrap_or_default().to_vec();
    (k, v)
}

/// Column values of a DataRow body (None for NULL).
pub fn data_row(body: &[u8]) -> Vec<Option<Vec<u8>>> {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut pos = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes([body[pos], body[pos + 1], body[pos + 2], body[pos + 3]]);
        pos += 4;
        if len < 0 {
            out.push(None);
        } else {
            out.push(Some(body[pos..pos + len as usize].to_vec()));
            pos += len as usize;
        }
    }
    out
}

/// The DataRows among `msgs`, each as its column values.
pub fn data_rows(msgs: &[Msg]) -> Vec<Vec<Option<Vec<u8>>>> {
    msgs.iter()
        .filter(|(tag, _)| *tag == b'D')
        .map(|(_, b)| data_row(b))
        .collect()
}

/// The value of one field of an ErrorResponse/NoticeResponse body.
pub fn error_field(body: &[u8], field: u8) -> Option<String> {
    let mut pos = 0;
    while pos < body.len() && body[pos] != 0 {
        let f = body[pos];
        let end = pos + 1 + body[pos + 1..].iter().position(|b| *b == 0)?;
        if f == field {
            return Some(String::from_utf8_lossy(&body[pos + 1..end]).into_owned());
        }
        pos = end + 1;
    }
    None
}

/// A raw connection through the proxy (or any server) on `port`, as postgres to test.
pub(crate) fn raw(port: u16) -> RawConn {
    RawConn::connect(port, &[("user", b"postgres"), ("database", b"test")])
        .unwrap()
        .0
}

fn cstr(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(s);
    b.push(0);
}

/// Where frontend messages go: straight to a connection, or into a buffer sent in one write.
pub(crate) trait Out {
    fn put(&mut self, tag: u8, body: &[u8]);
}

impl Out for RawConn {
    fn put(&mut self, tag: u8, body: &[u8]) {
        self.send(tag, body).unwrap();
    }
}

impl Out for Vec<u8> {
    fn put(&mut self, tag: u8, body: &[u8]) {
        self.push(tag);
        self.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        self.extend_from_slice(body);
    }
}

pub(crate) fn parse(c: &mut impl Out, name: &str, sql: &str, types: &[u32]) {
    let mut b = Vec::new();
    cstr(&mut b, name.as_bytes());
    cstr(&mut b, sql.as_bytes());
    b.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        b.extend_from_slice(&t.to_be_bytes());
    }
    c.put(b'P', &b);
}

pub(crate) fn bind(c: &mut impl Out, portal: &str, stmt: &str, params: &[&str]) {
    let mut b = Vec::new();
    cstr(&mut b, portal.as_bytes());
    cstr(&mut b, stmt.as_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        b.extend_from_slice(&(p.len() as i32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    c.put(b'B', &b);
}

pub(crate) fn execute(c: &mut impl Out, portal: &str) {
    let mut b = Vec::new();
    cstr(&mut b, portal.as_bytes());
    b.extend_from_slice(&0i32.to_be_bytes());
    c.put(b'E', &b);
}

pub(crate) fn close_statement(c: &mut impl Out, name: &str) {
    let mut b = vec![b'S'];
    cstr(&mut b, name.as_bytes());
    c.put(b'C', &b);
}

pub(crate) fn query(c: &mut impl Out, sql: &str) {
    let mut b = Vec::new();
    cstr(&mut b, sql.as_bytes());
    c.put(b'Q', &b);
}

pub(crate) fn sync(c: &mut RawConn) -> Vec<Msg> {
    c.send(b'S', &[]).unwrap();
    c.read_until_ready().unwrap()
}

pub(crate) fn codes(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'E')
        .filter_map(|(_, b)| error_field(b, b'C'))
        .collect()
}
