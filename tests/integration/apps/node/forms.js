// listen() in the forms Node accepts, in one worker with two binds (fds 3 and 4, ports
// P1 and P2, given as argv): prints one line per form with the fd the server got.
const http = require('http');
const net = require('net');
const dgram = require('dgram');
const [p1, p2, other, pipe] = process.argv.slice(2);
const fd = (s) => (s._handle && typeof s._handle.fd === 'number' ? s._handle.fd : -1);
const report = (form, s) => console.log(`form ${form}: fd ${fd(s)} port ${s.address().port || s.address()}`);
const forms = [
  ['listen(P1, host, cb)', (s, cb) => s.listen(Number(p1), '127.0.0.1', cb)],
  ['listen({port: "P2"})', (s, cb) => s.listen({ port: p2 }, cb)],
  ['listen(0, host)', (s, cb) => s.listen(0, '127.0.0.1', cb)],
  ['listen()', (s, cb) => s.listen(cb)],
  ['listen(path)', (s, cb) => s.listen(pipe, cb)],
  ['listen(other)', (s, cb) => s.listen(Number(other), '127.0.0.1', cb)],
];
(function next(i) {
  if (i === forms.length) {
    const u = dgram.createSocket('udp4');
    u.bind(0, '127.0.0.1', () => { console.log(`form dgram.bind(0, host): port ${u.address().port}`); u.close(); console.log('forms done'); });
    return;
  }
  const [form, listen] = forms[i];
  const s = (i < 2 ? http.createServer((req, res) => res.end(`hello from pid ${process.pid}\n`)) : net.createServer());
  s.on('error', (e) => { console.log(`form ${form}: error ${e.code} ${e.message}`); next(i + 1); });
  listen(s, () => { report(form, s); next(i + 1); });
}(0));
