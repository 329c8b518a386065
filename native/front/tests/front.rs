//! The front over plain TCP before a real upstream (a hyper server on a Unix socket that
//! echoes what it was sent): limits, refusals and what reaches the application.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use ppml_front::{Front, FrontConfig};

/// Answers every request with its method, path, headers and body length, one per line.
fn echo_upstream(path: PathBuf) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::UnixListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = service_fn(|request: Request<Incoming>| async move {
                        if request.uri().path().starts_with("/slow") {
                            tokio::time::sleep(Duration::from_millis(800)).await;
                        }
                        let mut text = format!("{} {}\n", request.method(), request.uri());
                        for (name, value) in request.headers() {
                            text += &format!("{name}: {}\n", value.to_str().unwrap_or("?"));
                        }
                        let body = request.into_body().collect().await?.to_bytes();
                        text += &format!("body {}\n", body.len());
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(text))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    })
}

fn config(upstream: PathBuf) -> FrontConfig {
    FrontConfig {
        host: "127.0.0.1".into(),
        port: 0,
        reuse_port: false,
        tls: None,
        upstream,
        grpc: None,
        max_header_bytes: 16 * 1024,
        header_timeout: Duration::from_secs(2),
        keep_alive: Duration::from_secs(2),
        body_timeout: Duration::from_millis(700),
        max_request_bytes: 1 << 20,
        max_connections: 4,
        upstream_timeout: Duration::from_secs(5),
        max_inflight: 8,
        threads: 1,
    }
}

struct Rig {
    front: Front,
    _dir: tempdir::Dir,
}

mod tempdir {
    use std::path::{Path, PathBuf};
    pub struct Dir(PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("ppml-front-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("temp dir");
            Dir(path)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn rig(tag: &str, with_upstream: bool, adjust: impl FnOnce(&mut FrontConfig)) -> Rig {
    let dir = tempdir::Dir::new(tag);
    let socket = dir.path().join("app.sock");
    if with_upstream {
        echo_upstream(socket.clone());
    }
    let mut config = config(socket);
    adjust(&mut config);
    let front = Front::bind(config).expect("bind");
    front.start().expect("start");
    Rig { front, _dir: dir }
}

fn connect(rig: &Rig) -> TcpStream {
    let stream = TcpStream::connect(rig.front.local_addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
}

/// Everything sent until the server closes (or 5 s pass).
fn read_all(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn exchange(rig: &Rig, bytes: &[u8]) -> String {
    let mut stream = connect(rig);
    stream.write_all(bytes).expect("write");
    read_all(&mut stream)
}

fn head_of(size: usize) -> Vec<u8> {
    let start = b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: ";
    let end = b"\r\n\r\n";
    let mut head = start.to_vec();
    head.extend(vec![b'a'; size - start.len() - end.len()]);
    head.extend_from_slice(end);
    head
}

#[test]
fn the_head_limit_is_exact() {
    let rig = rig("head", true, |_| {});
    assert!(exchange(&rig, &head_of(16 * 1024)).starts_with("HTTP/1.1 200"));
    assert!(exchange(&rig, &head_of(16 * 1024 + 1)).starts_with("HTTP/1.1 431"));
}

#[test]
fn a_declared_oversized_body_is_refused_unread() {
    let rig = rig("large", true, |_| {});
    let answer = exchange(
        &rig,
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("gateway.max_request_bytes"), "{answer}");
}

#[test]
fn a_chunked_body_past_the_limit_is_413() {
    let rig = rig("chunked", true, |c| c.max_request_bytes = 4096);
    let mut request = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        request.extend_from_slice(b"800\r\n");
        request.extend(vec![b'b'; 0x800]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = exchange(&rig, &request);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[test]
fn a_slow_body_is_cut_off_with_408() {
    let rig = rig("slow", true, |_| {});
    let started = Instant::now();
    let answer = exchange(
        &rig,
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc",
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn the_application_sees_the_request_and_the_client_address_but_no_hop_headers() {
    let rig = rig("echo", true, |_| {});
    let answer = exchange(
        &rig,
        b"POST /v2/models/m/infer?x=1 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\
          X-Ppml-Client: 6.6.6.6:1\r\nAuthorization: Bearer k\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("POST /v2/models/m/infer?x=1\n"), "{answer}");
    assert!(answer.contains("authorization: Bearer k\n"), "{answer}");
    assert!(answer.contains("x-ppml-client: 127.0.0.1:"), "{answer}");
    assert!(
        !answer.contains("6.6.6.6"),
        "a client must not choose its address: {answer}"
    );
    assert!(answer.contains("body 5\n"), "{answer}");
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let rig = rig("keepalive", true, |_| {});
    let mut stream = connect(&rig);
    let request = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut all = request.repeat(3);
    all.extend_from_slice(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(&all).expect("write");
    let answer = read_all(&mut stream);
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 4, "{answer}");
}

#[test]
fn inference_past_the_inflight_cap_is_429_at_once() {
    let rig = rig("inflight", true, |c| c.max_inflight = 2);
    let request =
        b"POST /slow/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = connect(&rig);
            stream.write_all(request).expect("write");
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let refused = exchange(&rig, request);
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("gateway.max_inflight"), "{refused}");
    assert!(started.elapsed() < Duration::from_millis(500));
    // other routes are not inference: not held to the cap
    let other = exchange(
        &rig,
        b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    for stream in &mut held {
        let answer = read_all(stream);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

#[test]
fn no_application_is_503_with_retry_after() {
    let rig = rig("down", false, |_| {});
    let answer = exchange(&rig, b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
}

#[test]
fn connections_past_the_cap_get_503() {
    let rig = rig("cap", true, |c| c.max_connections = 2);
    let held: Vec<TcpStream> = (0..2).map(|_| connect(&rig)).collect();
    std::thread::sleep(Duration::from_millis(100));
    let answer = exchange(&rig, b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("gateway.max_connections"), "{answer}");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let answer = exchange(
        &rig,
        b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn an_idle_connection_is_closed_after_the_head_deadline() {
    let rig = rig("idle", true, |c| {
        c.keep_alive = Duration::from_millis(500);
    });
    let mut stream = connect(&rig);
    let started = Instant::now();
    let answer = read_all(&mut stream);
    assert!(answer.is_empty(), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn stop_ends_serving() {
    let mut rig = rig("stop", true, |_| {});
    let address = rig.front.local_addr();
    rig.front.stop(Duration::from_millis(100));
    assert!(TcpStream::connect(address).is_err());
}
