// Two servers on the launcher's port in one process: the second must fail, naming the port.
const http = require('http');
http.createServer((req, res) => res.end(`hello from pid ${process.pid}\n`)).listen(process.env.PORT);
http.createServer(() => {}).listen(process.env.PORT).on('error', (e) => console.log(`second listen: ${e.code} ${e.message}`));
