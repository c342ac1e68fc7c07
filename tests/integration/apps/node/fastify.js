const fastify = require('fastify')();
fastify.get('/', async () => `hello from pid ${process.pid}\n`);
fastify.get('/slow', () => new Promise((r) => setTimeout(() => r(`slow answer from pid ${process.pid}\n`), Number(process.env.SLOW_MS || 1500))));
fastify.listen({ port: Number(process.env.PORT), host: '127.0.0.1' }, (err) => {
  if (err) { console.error(err); process.exit(1); }
});
